// Runs one launch request in a process of its own, so that a faulting kernel cannot take the caller down:
//   runner <kernels.so> <fd of the shared request file>
// Exit status: 0 success, 1 the kernel failed (message in request->error), 2 the library did not load;
// the runtime's signal handler exits with 3 after a fault.
#include <dlfcn.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>

#include "mslsim_run.h"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  int fd = std::atoi(argv[2]);
  struct stat st;
  if (fstat(fd, &st) != 0) return 2;
  void* mapped = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mapped == MAP_FAILED) return 2;
  char* base = static_cast<char*>(mapped);
  auto* request = reinterpret_cast<mslsim_request*>(base);
  void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!library) {
    std::snprintf(request->error, sizeof request->error, "cannot load %s: %s", argv[1], dlerror());
    return 2;
  }
  auto run = reinterpret_cast<int (*)(const mslsim_run_desc*)>(dlsym(library, "mslsim_run"));
  if (!run) {
    std::snprintf(request->error, sizeof request->error, "%s has no mslsim_run", argv[1]);
    return 2;
  }
  mslsim_buffer buffers[32];
  for (int s = 0; s < request->nschedules; ++s) {
    for (int i = 0; i < request->nbuffers; ++i) {
      const mslsim_request_buffer& b = request->buffers[i];
      buffers[i] = {b.slot, 0, base + b.input, base + b.result[s], b.size};
    }
    mslsim_run_desc desc = {};
    desc.kernel = request->kernel;
    desc.schedule = request->schedules[s];
    for (int k = 0; k < 3; ++k) {
      desc.grid[k] = request->grid[k];
      desc.threads[k] = request->threads[k];
    }
    desc.nbuffers = request->nbuffers;
    desc.buffers = buffers;
    for (int k = 0; k < 32; ++k) desc.threadgroup_memory[k] = request->threadgroup_memory[k];
    desc.seed = request->seed;
    desc.error = request->error;
    desc.error_size = sizeof request->error;
    request->progress = s;
    if (run(&desc) != 0) return 1;
  }
  return 0;
}
