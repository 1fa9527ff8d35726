#include "cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/simd.h"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace metal_marlin::cpu {
namespace {

// Workers spin this long after a job before sleeping: kernels are called back to back (one per
// layer), and a futex wake-up costs tens of microseconds, a large share of a small matmul. Kept
// short because a spinning worker takes a core from torch's own threads.
constexpr auto kSpinBeforeSleep = std::chrono::microseconds(50);

inline void cpu_relax() {
#if METAL_MARLIN_X86
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

int current_process_id() {
#if defined(__unix__) || defined(__APPLE__)
  return int(getpid());
#else
  return 0;
#endif
}

// One parallel_for call. Shared with the workers so that a worker waking up late (after the call
// returned) still finds valid counters: it sees no task left and never touches `body`.
struct Job {
  Job(uint64_t g, TaskBody b, int64_t n) : generation(g), body(b), n_tasks(n) {}

  // Claims and runs tasks until none are left.
  void drain(int thread) {
    for (int64_t task = next.fetch_add(1, std::memory_order_relaxed); task < n_tasks;
         task = next.fetch_add(1, std::memory_order_relaxed)) {
      body(task, thread);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  const uint64_t generation;
  const TaskBody body;
  const int64_t n_tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

class Pool {
 public:
  Pool() : pid_(current_process_id()) {}

  int pid() const { return pid_; }

  // False when another thread is using the pool; the caller then runs the job itself.
  bool try_run(int n_threads, int64_t n_tasks, TaskBody body) {
    std::unique_lock<std::mutex> dispatch(dispatch_mutex_, std::try_to_lock);
    if (!dispatch.owns_lock()) return false;
    const int n_workers = n_threads - 1;
    while (int(workers_.size()) < n_workers) {
      auto worker = std::make_unique<Worker>();
      Worker* w = worker.get();
      const int thread = int(workers_.size()) + 1;
      w->thread = std::thread([this, w, thread] { worker_loop(*w, thread); });
      workers_.push_back(std::move(worker));
    }

    auto job = std::make_shared<Job>(generation_ + 1, body, n_tasks);
    {
      // Published under the mutex so a worker cannot miss the wake-up between checking its ticket
      // and going to sleep.
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      generation_ = job->generation;
      for (int w = 0; w < n_workers; ++w) workers_[w]->ticket.store(generation_, std::memory_order_release);
    }
    wake_.notify_all();

    // The caller works too, and waits only for tasks already claimed: a worker that is slow to
    // wake (its core busy with another process's threads) just finds the work done.
    job->drain(0);
    while (job->done.load(std::memory_order_acquire) != n_tasks) cpu_relax();
    return true;
  }

 private:
  struct Worker {
    std::atomic<uint64_t> ticket{0};  // generation of the last job offered to this worker
    std::thread thread;
  };

  void worker_loop(Worker& worker, int thread) {
    uint64_t seen = 0;
    for (;;) {
      const auto deadline = std::chrono::steady_clock::now() + kSpinBeforeSleep;
      for (int spins = 0; worker.ticket.load(std::memory_order_acquire) == seen; ++spins) {
        if ((spins & 63) == 63 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return worker.ticket.load(std::memory_order_acquire) != seen; });
          break;
        }
        cpu_relax();
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = worker.ticket.load(std::memory_order_acquire);
        job = job_;
      }
      // A newer job this worker was not offered may have replaced its own: `thread` would be out
      // of that job's range. Its own job is then finished anyway.
      if (job->generation == seen) job->drain(thread);
    }
  }

  const int pid_;
  std::mutex dispatch_mutex_;  // one job at a time
  std::mutex mutex_;           // guards job_ and the tickets' changes
  std::condition_variable wake_;
  std::vector<std::unique_ptr<Worker>> workers_;
  uint64_t generation_ = 0;    // of the latest job
  std::shared_ptr<Job> job_;  // the latest job
};

Pool& pool() {
  // Deliberately leaked: joining blocked workers at interpreter exit can hang. A forked child
  // inherits the pool object but not its threads, so it starts a pool of its own.
  static std::atomic<Pool*> instance{nullptr};
  static std::mutex create_mutex;
  Pool* p = instance.load(std::memory_order_acquire);
  if (p && p->pid() == current_process_id()) return *p;
  std::lock_guard<std::mutex> lock(create_mutex);
  p = instance.load(std::memory_order_acquire);
  if (!p || p->pid() != current_process_id()) {
    p = new Pool();
    instance.store(p, std::memory_order_release);
  }
  return *p;
}

}  // namespace

int plan_threads(int requested, int64_t n_tasks) {
  const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  return int(std::min({int64_t(std::max(requested, 1)), hardware, std::max<int64_t>(n_tasks, 1)}));
}

void run_parallel(int n_threads, int64_t n_tasks, TaskBody body) {
  if (n_threads > 1 && n_tasks > 1 && pool().try_run(n_threads, n_tasks, body)) return;
  for (int64_t task = 0; task < n_tasks; ++task) body(task, 0);
}

}  // namespace metal_marlin::cpu
