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

#if METAL_MARLIN_X86
#include <immintrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace metal_marlin::cpu {
namespace {

// Workers spin this long after a job before sleeping: kernels are called back to back (one per
// layer), and a futex wake-up costs tens of microseconds, a large share of a small matmul.
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
      const int index = int(workers_.size()) + 1;
      w->thread = std::thread([this, w, index] { worker_loop(w->ticket, index); });
      workers_.push_back(std::move(worker));
    }

    body_ = &body;
    n_tasks_ = n_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    unfinished_workers_.store(n_workers, std::memory_order_relaxed);
    ++generation_;
    {
      // Tickets change under the mutex so a worker cannot miss the wake-up between checking its
      // ticket and going to sleep.
      std::lock_guard<std::mutex> lock(mutex_);
      for (int w = 0; w < n_workers; ++w) workers_[w]->ticket.store(generation_, std::memory_order_release);
    }
    wake_.notify_all();

    drain(0);
    while (unfinished_workers_.load(std::memory_order_acquire) != 0) cpu_relax();
    return true;
  }

 private:
  struct Worker {
    alignas(64) std::atomic<uint64_t> ticket{0};  // generation of the last job given to it
    std::thread thread;
  };

  void drain(int thread) {
    for (int64_t task = next_task_.fetch_add(1, std::memory_order_relaxed); task < n_tasks_;
         task = next_task_.fetch_add(1, std::memory_order_relaxed)) {
      (*body_)(task, thread);
    }
  }

  void worker_loop(std::atomic<uint64_t>& ticket, int index) {
    uint64_t done = 0;
    for (;;) {
      const auto deadline = std::chrono::steady_clock::now() + kSpinBeforeSleep;
      for (int spins = 0; ticket.load(std::memory_order_acquire) == done; ++spins) {
        if ((spins & 63) == 63 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] { return ticket.load(std::memory_order_acquire) != done; });
          break;
        }
        cpu_relax();
      }
      done = ticket.load(std::memory_order_acquire);
      // The job's fields stay valid until this worker reports back: the caller waits for it.
      drain(index);
      unfinished_workers_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  const int pid_;
  std::mutex dispatch_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::unique_ptr<Worker>> workers_;
  uint64_t generation_ = 0;

  // The current job.
  TaskBody* body_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  std::atomic<int> unfinished_workers_{0};
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
  const int hardware = int(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t n = std::min<int64_t>({int64_t(std::max(requested, 1)), int64_t(hardware), std::max<int64_t>(n_tasks, 1)});
  return int(n);
}

void run_parallel(int n_threads, int64_t n_tasks, TaskBody body) {
  if (n_threads > 1 && n_tasks > 1 && pool().try_run(n_threads, n_tasks, body)) return;
  for (int64_t task = 0; task < n_tasks; ++task) body(task, 0);
}

}  // namespace metal_marlin::cpu
