// The simulator runtime: runs one kernel launch on the CPU. Every MSL thread of a threadgroup is a fiber
// (a stack plus a tiny x86-64 context switch); threadgroups run one after another. Fibers run until they
// block at a threadgroup barrier or a simdgroup collective; the scheduler releases a barrier when every
// live thread of the threadgroup waits at the same call site, and completes a collective when every live
// lane of the simdgroup has arrived at the same one. The order in which runnable fibers run is the
// schedule. Buffers end at PROT_NONE guard pages; a fault is reported through the error buffer that the
// Python side shares with this (forked) process.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "mslsim_abi.h"
#include "mslsim_run.h"

extern "C" const mslsim::Kernel mslsim_kernels[];
extern "C" const int mslsim_kernel_count;

extern "C" void mslsim_switch(void** save_sp, void* load_sp);
extern "C" void mslsim_fiber_start();
extern "C" [[noreturn]] void mslsim_fiber_main();

// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp, switches
// to load_sp and pops the registers saved there. A new fiber's stack is prepared to "return" into
// mslsim_fiber_start.
asm(R"(
  .text
  .globl mslsim_switch
  .hidden mslsim_switch
  .type mslsim_switch, @function
mslsim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mslsim_switch, .-mslsim_switch

  .globl mslsim_fiber_start
  .hidden mslsim_fiber_start
  .type mslsim_fiber_start, @function
mslsim_fiber_start:
  call mslsim_fiber_main
  ud2
  .size mslsim_fiber_start, .-mslsim_fiber_start
)");

namespace mslsim {
namespace {

constexpr unsigned kSimdWidth = 32;
constexpr usize kThreadgroupMemoryLimit = 32768;
constexpr unsigned kMaxThreads = 1024;
constexpr usize kStackSize = 512 << 10;
constexpr int kMaxSlots = 32;
constexpr unsigned char kPoison = 0xFF;  // NaN in every float format, -1 in every integer

enum Schedule { schedule_forward, schedule_reverse, schedule_random, schedule_runahead };
enum State : unsigned char { runnable, at_collective, at_barrier, exited };

struct Fiber {
  void* sp;
  unsigned index;   // thread_index_in_threadgroup
  unsigned pos[3];  // thread_position_in_threadgroup
  State state;
  const Loc* site;  // where it waits
  CollFn fn;
  CollArg* arg;
  const char* what;
};

struct Simdgroup {
  unsigned first, count;  // fibers [first, first + count)
  unsigned live, arrived;
};

// A block of memory with a PROT_NONE page on each side; the data ends at the upper guard page.
struct Guarded {
  char* base = nullptr;  // lower guard page
  usize length = 0;
  char* data = nullptr;
  usize size = 0;
  char* upper_guard() const { return base + length - page_size(); }
  static usize page_size() { return static_cast<usize>(sysconf(_SC_PAGESIZE)); }
};

struct Static {
  unsigned site;
  char* address;
};

struct Run {
  const Kernel* kernel = nullptr;
  Schedule schedule = schedule_forward;
  unsigned grid[3] = {}, threads[3] = {};
  unsigned nthreads = 0;
  unsigned group[3] = {};
  std::uint64_t rng = 0;

  Guarded buffers[kMaxSlots];
  bool bound[kMaxSlots] = {};

  Guarded arena;                  // threadgroup memory, allocated downwards from the upper guard page
  usize arena_used = 0;
  usize dynamic_size[kMaxSlots] = {};  // bytes per [[threadgroup(i)]] slot
  char* dynamic[kMaxSlots] = {};       // [[threadgroup(i)]] pointers
  std::vector<Static> statics;    // `threadgroup T x[N];` declarations met so far in this threadgroup

  std::vector<Fiber> fibers;
  std::vector<Simdgroup> simdgroups;
  std::vector<char*> stacks;  // upper ends; each stack has a guard page below it
  std::vector<char*> stack_guards;
  unsigned live = 0, waiting_at_barrier = 0, returned = 0, phase = 0;
  void* scheduler_sp = nullptr;
  Fiber* current = nullptr;

  std::string error;
  char* error_out = nullptr;
  usize error_size = 0;
};

Run R;
char alt_stack[1 << 16];

std::string loc_text(const Loc* loc) {
  if (!loc) return "?";
  return std::string(loc->file) + ":" + std::to_string(loc->line) + ":" + std::to_string(loc->column);
}

bool same_site(const Loc* a, const Loc* b) {
  return a == b || (a && b && a->line == b->line && a->column == b->column && std::strcmp(a->file, b->file) == 0);
}

std::string thread_text(const Fiber& f) {
  char text[160];
  std::snprintf(text, sizeof text, "thread (%u,%u,%u) of threadgroup (%u,%u,%u)", f.pos[0], f.pos[1], f.pos[2],
                R.group[0], R.group[1], R.group[2]);
  return text;
}

// "0-15, 20" for a sorted list of thread indices.
std::string ranges(const std::vector<unsigned>& ids) {
  std::string out;
  for (usize i = 0; i < ids.size();) {
    usize j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out;
}

void fail(const std::string& message) {
  if (R.error.empty()) R.error = message;
}

// Where each thread of [first, first + count) is: grouped by state and call site.
std::string describe_threads(unsigned first, unsigned count) {
  struct Group {
    State state;
    const Loc* site;
    const char* what;
    std::vector<unsigned> ids;
  };
  std::vector<Group> groups;
  for (unsigned i = first; i < first + count; ++i) {
    const Fiber& f = R.fibers[i];
    Group* g = nullptr;
    for (auto& candidate : groups)
      if (candidate.state == f.state && (f.state == exited || f.state == runnable || same_site(candidate.site, f.site)))
        g = &candidate;
    if (!g) {
      groups.push_back({f.state, f.site, f.what, {}});
      g = &groups.back();
    }
    g->ids.push_back(f.index);
  }
  std::string out;
  for (const auto& g : groups) {
    if (!out.empty()) out += "; ";
    out += "threads " + ranges(g.ids);
    if (g.state == exited) out += " returned";
    else if (g.state == runnable) out += " are running";
    else out += std::string(" wait at ") + g.what + " (" + loc_text(g.site) + ")";
  }
  return out;
}

std::string group_text() {
  char text[64];
  std::snprintf(text, sizeof text, "threadgroup (%u,%u,%u)", R.group[0], R.group[1], R.group[2]);
  return text;
}

void check_collective(Simdgroup& sg) {
  if (sg.arrived == 0 || sg.arrived < sg.live) return;
  Fiber* lead = nullptr;
  for (unsigned i = sg.first; i < sg.first + sg.count; ++i) {
    Fiber& f = R.fibers[i];
    if (f.state != at_collective) continue;
    if (!lead) {
      lead = &f;
    } else if (f.fn != lead->fn || !same_site(f.site, lead->site)) {
      fail("divergent simdgroup collective in simdgroup " + std::to_string(sg.first / kSimdWidth) + " of " +
           group_text() + ": " + describe_threads(sg.first, sg.count));
      return;
    }
  }
  CollArg* lanes[kSimdWidth] = {};
  for (unsigned i = sg.first; i < sg.first + sg.count; ++i) {
    Fiber& f = R.fibers[i];
    if (f.state != at_collective) continue;
    f.arg->lane = i - sg.first;
    lanes[i - sg.first] = f.arg;
  }
  if (lead->fn) {
    if (const char* message = lead->fn(lanes)) {
      fail(std::string(message) + " at " + loc_text(lead->site) + " in simdgroup " +
           std::to_string(sg.first / kSimdWidth) + " of " + group_text());
      return;
    }
  }
  for (unsigned i = sg.first; i < sg.first + sg.count; ++i)
    if (R.fibers[i].state == at_collective) R.fibers[i].state = runnable;
  sg.arrived = 0;
}

void check_barrier() {
  if (R.live == 0 || R.waiting_at_barrier < R.live) return;
  const Loc* site = nullptr;
  for (const Fiber& f : R.fibers) {
    if (f.state != at_barrier) continue;
    if (!site) {
      site = f.site;
    } else if (!same_site(site, f.site)) {
      fail("threadgroup_barrier not reached by every thread (divergent barriers) in " + group_text() + ": " +
           describe_threads(0, R.nthreads));
      return;
    }
  }
  if (R.returned) {
    fail("threadgroup_barrier not reached by every thread (divergent barrier, or a return before it) in " +
         group_text() + ": " + describe_threads(0, R.nthreads));
    return;
  }
  for (Fiber& f : R.fibers) f.state = runnable;
  R.waiting_at_barrier = 0;
  ++R.phase;
}

void resume(Fiber& f) {
  R.current = &f;
  mslsim_switch(&R.scheduler_sp, f.sp);
  R.current = nullptr;
  if (!R.error.empty()) return;
  Simdgroup& sg = R.simdgroups[f.index / kSimdWidth];
  switch (f.state) {
    case exited:
      --R.live;
      --sg.live;
      ++R.returned;
      check_collective(sg);
      if (R.error.empty()) check_barrier();
      break;
    case at_collective:
      ++sg.arrived;
      check_collective(sg);
      break;
    case at_barrier:
      ++R.waiting_at_barrier;
      check_barrier();
      break;
    case runnable:
      break;
  }
}

// Called on a fiber: gives control back to the scheduler until the fiber is runnable again.
void block() {
  Fiber* f = R.current;
  mslsim_switch(&f->sp, R.scheduler_sp);
}

std::uint64_t next_random() {
  R.rng ^= R.rng >> 12;
  R.rng ^= R.rng << 25;
  R.rng ^= R.rng >> 27;
  return R.rng * 0x2545F4914F6CDD1DULL;
}

void shuffle(std::vector<unsigned>& order) {
  for (usize i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
}

// All simdgroups move in step: every sweep resumes each runnable thread once, in the schedule's order.
void run_in_step() {
  std::vector<unsigned> order(R.nthreads);
  for (unsigned i = 0; i < R.nthreads; ++i) order[i] = R.schedule == schedule_reverse ? R.nthreads - 1 - i : i;
  for (;;) {
    if (R.schedule == schedule_random) shuffle(order);
    bool progressed = false;
    for (unsigned i : order) {
      if (R.fibers[i].state != runnable) continue;
      progressed = true;
      resume(R.fibers[i]);
      if (!R.error.empty()) return;
    }
    if (!progressed) return;
  }
}

// One simdgroup runs as far as it can (until all its threads wait at a threadgroup barrier or have
// returned) before the next one moves; the simdgroup order flips at every barrier.
void run_ahead() {
  const unsigned nsimd = static_cast<unsigned>(R.simdgroups.size());
  for (;;) {
    Simdgroup* next = nullptr;
    for (unsigned k = 0; k < nsimd && !next; ++k) {
      Simdgroup& sg = R.simdgroups[R.phase % 2 ? nsimd - 1 - k : k];
      for (unsigned i = sg.first; i < sg.first + sg.count; ++i)
        if (R.fibers[i].state == runnable) next = &sg;
    }
    if (!next) return;
    for (bool progressed = true; progressed;) {
      progressed = false;
      for (unsigned i = next->first; i < next->first + next->count; ++i) {
        if (R.fibers[i].state != runnable) continue;
        progressed = true;
        resume(R.fibers[i]);
        if (!R.error.empty()) return;
      }
    }
  }
}

void start_fiber(Fiber& f, char* stack_top) {
  auto top = reinterpret_cast<std::uintptr_t>(stack_top) & ~static_cast<std::uintptr_t>(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = reinterpret_cast<void*>(&mslsim_fiber_start);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.state = runnable;
  f.site = nullptr;
  f.fn = nullptr;
  f.arg = nullptr;
  f.what = nullptr;
}

// Threadgroup-memory block for the current threadgroup; the first caller of a [[threadgroup(i)]] slot or a
// declaration site places it below the blocks placed before it.
char* arena_allocate(usize size, usize align, const std::string& what) {
  usize aligned = (size + 15) / 16 * 16;
  usize start = R.arena_used + aligned;
  if (align > 16) start = (start + align - 1) / align * align;
  if (start > kThreadgroupMemoryLimit) {
    fail("threadgroup memory exceeds the 32 KiB limit: " + std::to_string(start) + " bytes with " + what);
    return nullptr;
  }
  R.arena_used = start;
  return R.arena.upper_guard() - start;
}

void run_threadgroup() {
  std::memset(R.arena.data, kPoison, R.arena.size);
  R.statics.clear();
  R.arena_used = 0;
  // [[threadgroup(i)]] buffers first (slot order), then declarations as threads meet them.
  for (int slot = 0; slot < kMaxSlots; ++slot)
    R.dynamic[slot] = R.dynamic_size[slot] ? arena_allocate(R.dynamic_size[slot], 16, "dynamic memory") : nullptr;
  R.live = R.nthreads;
  R.waiting_at_barrier = R.returned = R.phase = 0;
  for (unsigned i = 0; i < R.nthreads; ++i) start_fiber(R.fibers[i], R.stacks[i]);
  for (Simdgroup& sg : R.simdgroups) {
    sg.live = sg.count;
    sg.arrived = 0;
  }
  if (R.schedule == schedule_runahead) run_ahead();
  else run_in_step();
  if (R.error.empty() && R.live > 0)
    fail("deadlock in " + group_text() + ": " + describe_threads(0, R.nthreads));
}

// The data ends exactly at the upper guard page, so the first byte past the end faults; its start is as
// aligned as its size, enough for the vector accesses that stay in bounds. The poison before it is checked
// after the run.
bool allocate(Guarded& g, usize size) {
  const usize page = Guarded::page_size();
  g.length = (size + page - 1) / page * page + 2 * page;
  void* base = mmap(nullptr, g.length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return false;
  g.base = static_cast<char*>(base);
  mprotect(g.base, page, PROT_NONE);
  mprotect(g.upper_guard(), page, PROT_NONE);
  std::memset(g.base + page, kPoison, g.length - 2 * page);
  g.size = size;
  g.data = g.upper_guard() - size;
  return true;
}

void release(Guarded& g) {
  if (g.base) munmap(g.base, g.length);
  g = Guarded();
}

// Offset (negative) of the first byte before the data that is no longer poison, or 0.
long damaged_padding(const Guarded& g) {
  for (const char* p = g.base + Guarded::page_size(); p < g.data; ++p)
    if (static_cast<unsigned char>(*p) != kPoison) return p - g.data;
  return 0;
}

void ensure_stacks(unsigned n) {
  const usize page = Guarded::page_size();
  while (R.stacks.size() < n) {
    void* base = mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (base == MAP_FAILED) {
      fail("cannot allocate fiber stacks");
      return;
    }
    mprotect(base, page, PROT_NONE);
    R.stack_guards.push_back(static_cast<char*>(base));
    R.stacks.push_back(static_cast<char*>(base) + page + kStackSize);
  }
}

void write_error(const char* text) {
  if (!R.error_out || R.error_size == 0) return;
  std::snprintf(R.error_out, R.error_size, "%s", text);
}

std::string describe_address(const char* address) {
  const usize page = Guarded::page_size();
  char text[256];
  for (int slot = 0; slot < kMaxSlots; ++slot) {
    const Guarded& g = R.buffers[slot];
    if (!R.bound[slot] || address < g.base || address >= g.base + g.length) continue;
    std::snprintf(text, sizeof text, "out-of-bounds access to buffer(%d) at byte offset %ld (the buffer has %lu bytes)",
                  slot, static_cast<long>(address - g.data), static_cast<unsigned long>(g.size));
    return text;
  }
  if (R.arena.base && address >= R.arena.base && address < R.arena.base + R.arena.length) {
    std::snprintf(text, sizeof text, "out-of-bounds access to threadgroup memory (%ld bytes past its end)",
                  static_cast<long>(address - R.arena.upper_guard()));
    return text;
  }
  for (char* guard : R.stack_guards)
    if (address >= guard && address < guard + page)
      return "stack overflow (thread-local arrays too large, or recursion)";
  std::snprintf(text, sizeof text, "invalid memory access at address %p (null or wild pointer, or a misaligned "
                "vector access)", static_cast<const void*>(address));
  return text;
}

void on_signal(int sig, siginfo_t* info, void*) {
  std::string cause;
  switch (sig) {
    case SIGSEGV:
    case SIGBUS: cause = describe_address(static_cast<const char*>(info->si_addr)); break;
    case SIGFPE: cause = "integer division by zero or overflow"; break;
    case SIGILL:
    case SIGTRAP: cause = "trap (undefined behaviour reached)"; break;
    default: cause = "signal " + std::to_string(sig); break;
  }
  if (R.current) cause += " in " + thread_text(*R.current);
  write_error(cause.c_str());
  _exit(3);
}

void install_signal_handlers() {
  stack_t ss = {};
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa = {};
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT}) sigaction(sig, &sa, nullptr);
}

bool bind(const mslsim_run_desc& d) {
  const Kernel& k = *R.kernel;
  for (int i = 0; i < d.nbuffers; ++i) {
    const mslsim_buffer& b = d.buffers[i];
    if (b.slot < 0 || b.slot >= kMaxSlots || R.bound[b.slot]) {
      fail("buffer index " + std::to_string(b.slot) + " is invalid or bound twice");
      return false;
    }
    if (!allocate(R.buffers[b.slot], b.size)) {
      fail("cannot allocate buffer(" + std::to_string(b.slot) + ")");
      return false;
    }
    std::memcpy(R.buffers[b.slot].data, b.source, b.size);
    R.bound[b.slot] = true;
  }
  usize dynamic_total = 0;
  for (int p = 0; p < k.nparams; ++p) {
    const ParamDesc& desc = k.params[p];
    const ParamType& type = k.types[p];
    if (desc.kind == param_buffer) {
      if (!R.bound[desc.index]) {
        fail("buffer(" + std::to_string(desc.index) + ") is not bound");
        return false;
      }
      if (type.is_reference && R.buffers[desc.index].size < type.referent_size) {
        fail("buffer(" + std::to_string(desc.index) + ") has " + std::to_string(R.buffers[desc.index].size) +
             " bytes but the kernel reads a " + std::to_string(type.referent_size) + "-byte value from it");
        return false;
      }
    } else if (desc.kind == param_threadgroup) {
      usize size = d.threadgroup_memory[desc.index];
      if (size == 0) {
        fail("threadgroup_memory[" + std::to_string(desc.index) + "] is not given");
        return false;
      }
      dynamic_total += size;
    }
  }
  for (int slot = 0; slot < kMaxSlots; ++slot) {
    if (!R.bound[slot]) continue;
    bool used = false;
    for (int p = 0; p < k.nparams; ++p) used |= k.params[p].kind == param_buffer && k.params[p].index == slot;
    if (!used) {
      fail("buffer(" + std::to_string(slot) + ") is bound but the kernel has no [[buffer(" + std::to_string(slot) +
           ")]] parameter");
      return false;
    }
  }
  if (dynamic_total > kThreadgroupMemoryLimit) {
    fail("threadgroup memory " + std::to_string(dynamic_total) + " bytes exceeds the 32 KiB limit");
    return false;
  }
  return allocate(R.arena, kThreadgroupMemoryLimit);
}

void unbind() {
  for (int slot = 0; slot < kMaxSlots; ++slot) {
    release(R.buffers[slot]);
    R.bound[slot] = false;
  }
  release(R.arena);
}


}  // namespace

void* buffer_address(int index) { return R.buffers[index].data; }

void* threadgroup_address(int index) { return R.dynamic[index]; }

void builtin_value(int builtin, unsigned out[3]) {
  const Fiber& f = *R.current;
  const unsigned nsimd = (R.nthreads + kSimdWidth - 1) / kSimdWidth;
  out[0] = out[1] = out[2] = 0;
  switch (builtin) {
    case thread_position_in_grid:
      for (int i = 0; i < 3; ++i) out[i] = R.group[i] * R.threads[i] + f.pos[i];
      break;
    case thread_position_in_threadgroup:
      for (int i = 0; i < 3; ++i) out[i] = f.pos[i];
      break;
    case threadgroup_position_in_grid:
      for (int i = 0; i < 3; ++i) out[i] = R.group[i];
      break;
    case threads_per_threadgroup:
      for (int i = 0; i < 3; ++i) out[i] = R.threads[i];
      break;
    case threadgroups_per_grid:
      for (int i = 0; i < 3; ++i) out[i] = R.grid[i];
      break;
    case threads_per_grid:
      for (int i = 0; i < 3; ++i) out[i] = R.grid[i] * R.threads[i];
      break;
    case thread_index_in_threadgroup: out[0] = f.index; break;
    case thread_index_in_simdgroup: out[0] = f.index % kSimdWidth; break;
    case simdgroup_index_in_threadgroup: out[0] = f.index / kSimdWidth; break;
    case simdgroups_per_threadgroup:
    case dispatch_simdgroups_per_threadgroup: out[0] = nsimd; break;
    case threads_per_simdgroup:
    case thread_execution_width: out[0] = kSimdWidth; break;
    case thread_index_in_quadgroup: out[0] = f.index % 4; break;
    case quadgroup_index_in_threadgroup: out[0] = f.index / 4; break;
    case quadgroups_per_threadgroup: out[0] = (R.nthreads + 3) / 4; break;
  }
}

void* threadgroup_static(unsigned site, usize size, usize align, const Loc* loc) {
  for (const Static& s : R.statics)
    if (s.site == site) return s.address;
  char* address = arena_allocate(size, align, "the declaration at " + loc_text(loc));
  if (!address) {
    block();  // the scheduler stops at the error
    __builtin_unreachable();
  }
  R.statics.push_back({site, address});
  return address;
}

void collective(CollFn fn, CollArg* arg, const Loc* loc, const char* name) {
  Fiber* f = R.current;
  f->state = at_collective;
  f->fn = fn;
  f->arg = arg;
  f->site = loc;
  f->what = name;
  block();
}

void threadgroup_barrier_wait(const Loc* loc) {
  Fiber* f = R.current;
  f->state = at_barrier;
  f->site = loc;
  f->what = "threadgroup_barrier";
  block();
}

}  // namespace mslsim

extern "C" void mslsim_fiber_main() {
  using namespace mslsim;
  R.kernel->entry();
  R.current->state = exited;
  block();
  __builtin_unreachable();
}


extern "C" __attribute__((visibility("default"))) int mslsim_run(const mslsim_run_desc* d) {
  using namespace mslsim;
  R.error.clear();
  R.error_out = d->error;
  R.error_size = d->error_size;
  install_signal_handlers();
  if (d->kernel < 0 || d->kernel >= mslsim_kernel_count) {
    write_error("no such kernel");
    return 1;
  }
  R.kernel = &mslsim_kernels[d->kernel];
  R.schedule = static_cast<Schedule>(d->schedule);
  R.rng = d->seed * 0x9E3779B97F4A7C15ULL + 1;
  R.nthreads = 1;
  unsigned ngroups = 1;
  for (int i = 0; i < 3; ++i) {
    R.grid[i] = d->grid[i];
    R.threads[i] = d->threads[i];
    R.nthreads *= d->threads[i];
    ngroups *= d->grid[i];
  }
  if (R.nthreads == 0 || R.nthreads > kMaxThreads) fail("threads per threadgroup must be 1..1024");
  else if (R.kernel->max_threads && R.nthreads > R.kernel->max_threads)
    fail("threads per threadgroup exceed [[max_total_threads_per_threadgroup(" +
         std::to_string(R.kernel->max_threads) + ")]]");
  if (R.error.empty() && bind(*d)) {
    for (int slot = 0; slot < kMaxSlots; ++slot) {
      R.dynamic_size[slot] = d->threadgroup_memory[slot];
      if (R.dynamic_size[slot] == 0) continue;
      bool used = false;
      for (int p = 0; p < R.kernel->nparams; ++p)
        used |= R.kernel->params[p].kind == param_threadgroup && R.kernel->params[p].index == slot;
      if (!used) fail("threadgroup_memory[" + std::to_string(slot) + "] is given but the kernel has no [[threadgroup(" +
                      std::to_string(slot) + ")]] parameter");
    }
    ensure_stacks(R.nthreads);
    R.fibers.assign(R.nthreads, Fiber());
    for (unsigned i = 0; i < R.nthreads; ++i) {
      Fiber& f = R.fibers[i];
      f.index = i;
      f.pos[0] = i % R.threads[0];
      f.pos[1] = i / R.threads[0] % R.threads[1];
      f.pos[2] = i / (R.threads[0] * R.threads[1]);
    }
    R.simdgroups.clear();
    for (unsigned first = 0; first < R.nthreads; first += kSimdWidth)
      R.simdgroups.push_back({first, std::min(kSimdWidth, R.nthreads - first), 0, 0});
    std::vector<unsigned> order(ngroups);
    for (unsigned i = 0; i < ngroups; ++i) order[i] = R.schedule == schedule_reverse ? ngroups - 1 - i : i;
    if (R.schedule == schedule_random) shuffle(order);
    for (unsigned g = 0; g < ngroups && R.error.empty(); ++g) {
      R.group[0] = order[g] % R.grid[0];
      R.group[1] = order[g] / R.grid[0] % R.grid[1];
      R.group[2] = order[g] / (R.grid[0] * R.grid[1]);
      run_threadgroup();
    }
    for (int i = 0; i < d->nbuffers && R.error.empty(); ++i) {
      const mslsim_buffer& b = d->buffers[i];
      long offset = damaged_padding(R.buffers[b.slot]);
      if (offset < 0)
        fail("out-of-bounds write to buffer(" + std::to_string(b.slot) + ") at byte offset " + std::to_string(offset) +
             " (the buffer has " + std::to_string(b.size) + " bytes)");
      else
        std::memcpy(b.result, R.buffers[b.slot].data, b.size);
    }
  }
  unbind();
  if (!R.error.empty()) {
    write_error(R.error.c_str());
    return 1;
  }
  return 0;
}
