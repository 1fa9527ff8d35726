// A small persistent thread pool for the CPU kernels. Not OpenMP: torch already runs libgomp and
// two OpenMP runtimes in one process fight over the cores.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace metal_marlin::cpu {

// A non-owning reference to a callable body(task, thread), valid while the callable lives.
class TaskBody {
 public:
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, TaskBody>>>
  explicit TaskBody(F& body)
      : object_(&body), invoke_([](void* object, int64_t task, int thread) {
          (*static_cast<F*>(object))(task, thread);
        }) {}

  void operator()(int64_t task, int thread) const { invoke_(object_, task, thread); }

 private:
  void* object_;
  void (*invoke_)(void*, int64_t, int);
};

// The number of threads parallel_for will use for `n_tasks` tasks when asked for `requested`:
// at least 1, at most the task count and the machine's hardware threads. Size per-thread
// scratch with it.
int plan_threads(int requested, int64_t n_tasks);

// Runs body(task, thread) for every task in [0, n_tasks), each exactly once, spread over
// `n_threads` threads (from plan_threads): thread 0 is the caller, threads 1.. are pool workers.
// Tasks are handed out dynamically, so uneven tasks balance. Returns when all tasks are done.
// A single thread runs inline without touching the pool; a call made while another call is using
// the pool also runs inline rather than waiting for it.
void run_parallel(int n_threads, int64_t n_tasks, TaskBody body);

template <class F>
void parallel_for(int n_threads, int64_t n_tasks, F&& body) {
  if (n_threads <= 1 || n_tasks <= 1) {
    for (int64_t task = 0; task < n_tasks; ++task) body(task, 0);
    return;
  }
  run_parallel(n_threads, n_tasks, TaskBody(body));
}

}  // namespace metal_marlin::cpu
