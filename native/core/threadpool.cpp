// Persistent fork-join thread pool. A parallel region is published by bumping an
// atomic epoch; workers that ran a region recently are still spinning on it and pick
// the new one up within ~1 µs, workers idle for longer sleep on a condition variable
// (so an idle model costs no CPU) and are woken by the caller.
//
// Each thread index of a region is a slot that is claimed before it runs. Worker t claims
// slot t; the caller runs slot 0 and then claims and runs any slot whose worker has not
// started yet (still waking up, or its CPU taken by another process or the hypervisor,
// which on shared 2-vCPU machines lasts milliseconds). fn(t, n) still runs exactly once
// per t, concurrently with the others whenever the workers are ready, and the caller
// never waits for a worker that has not begun. (So fn must not wait for another thread
// index inside a region, which run() never promised anyway.)
#include "core/threadpool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RF_CPU_RELAX() _mm_pause()
#else
#define RF_CPU_RELAX() std::this_thread::yield()
#endif

namespace rf {

namespace {

using Clock = std::chrono::steady_clock;

// How long a worker keeps spinning after its last region before it sleeps. Decode runs
// a region every few tens of µs, so this keeps workers hot for the whole token loop.
constexpr auto kSpinTime = std::chrono::microseconds(150);
// Spins between clock reads (a clock read is ~20 ns; a pause ~10-40 cycles).
constexpr int kSpinsPerClockCheck = 64;

}  // namespace

struct ThreadPool::Impl {
  int n_threads = 1;
  std::vector<std::thread> workers;

  // Bumped by run() to publish a region; workers compare it with the last one they ran.
  alignas(64) std::atomic<uint64_t> epoch{0};
  // Slots 1..n-1 of the current region not finished yet (by a worker or the caller).
  alignas(64) std::atomic<int> pending{0};
  // Workers blocked on the condition variable (run() only takes the mutex when > 0).
  alignas(64) std::atomic<int> sleepers{0};
  std::atomic<bool> stop{false};

  const std::function<void(int, int)>* job = nullptr;  // valid while pending > 0
  // slot_epoch[t]: the last epoch whose slot t was claimed (by worker t or the caller).
  std::unique_ptr<std::atomic<uint64_t>[]> slot_epoch;
  std::exception_ptr error;  // first exception thrown by slots 1..n-1
  std::mutex error_mutex;

  std::mutex mutex;
  std::condition_variable wake;

  void worker_main(int thread_index);
  // Claims slot t of region e; false when someone already has.
  bool slot_claim(int t, uint64_t e);
  // Runs slot t of the current job, records an exception, marks the slot done.
  void slot_run(int t);
  // Returns once epoch != seen (spinning, then sleeping).
  uint64_t epoch_wait(uint64_t seen);
};

uint64_t ThreadPool::Impl::epoch_wait(uint64_t seen) {
  auto spin_end = Clock::now() + kSpinTime;
  for (;;) {
    for (int i = 0; i < kSpinsPerClockCheck; ++i) {
      uint64_t e = epoch.load(std::memory_order_acquire);
      if (e != seen) return e;
      RF_CPU_RELAX();
    }
    if (Clock::now() >= spin_end) break;
  }
  std::unique_lock<std::mutex> lock(mutex);
  // seq_cst increment and load pair with run()'s epoch store and sleepers load, so either
  // the worker sees the new epoch here or run() sees the sleeper and notifies.
  sleepers.fetch_add(1, std::memory_order_seq_cst);
  uint64_t e;
  while ((e = epoch.load(std::memory_order_seq_cst)) == seen) wake.wait(lock);
  sleepers.fetch_sub(1, std::memory_order_relaxed);
  return e;
}

bool ThreadPool::Impl::slot_claim(int t, uint64_t e) {
  // Epochs only grow: a worker holding a stale e (it read the epoch, then lost its CPU while
  // the caller ran its slot in region e and later ones) must not claim a newer region.
  uint64_t cur = slot_epoch[t].load(std::memory_order_relaxed);
  return cur < e && slot_epoch[t].compare_exchange_strong(cur, e, std::memory_order_acq_rel);
}

void ThreadPool::Impl::slot_run(int t) {
  try {
    (*job)(t, n_threads);
  } catch (...) {
    std::lock_guard<std::mutex> g(error_mutex);
    if (!error) error = std::current_exception();
  }
  pending.fetch_sub(1, std::memory_order_release);
}

void ThreadPool::Impl::worker_main(int thread_index) {
  uint64_t seen = 0;
  for (;;) {
    seen = epoch_wait(seen);
    if (stop.load(std::memory_order_acquire)) return;
    // A worker late enough to find its slot taken by the caller skips the region. When the
    // claim succeeds, pending still counts this slot, so the region (and job) stays live.
    if (slot_claim(thread_index, seen)) slot_run(thread_index);
  }
}

ThreadPool::ThreadPool(int n_threads) : impl_(new Impl), n_threads_(n_threads < 1 ? 1 : n_threads) {
  impl_->n_threads = n_threads_;
  impl_->slot_epoch.reset(new std::atomic<uint64_t>[n_threads_]);
  for (int t = 0; t < n_threads_; ++t) impl_->slot_epoch[t].store(0, std::memory_order_relaxed);
  impl_->workers.reserve(n_threads_ - 1);
  try {
    for (int t = 1; t < n_threads_; ++t) impl_->workers.emplace_back([this, t] { impl_->worker_main(t); });
  } catch (...) {
    // The system refused a thread (a limit on threads or memory): the ones started are joined
    // and the state freed (no destructor runs for a constructor that throws: they leaked).
    stop_workers();
    throw;
  }
}

void ThreadPool::stop_workers() {
  impl_->stop.store(true, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->epoch.fetch_add(1, std::memory_order_seq_cst);
  }
  impl_->wake.notify_all();
  for (auto& w : impl_->workers) w.join();
  delete impl_;
  impl_ = nullptr;
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  if (n_threads_ == 1) {
    fn(0, 1);
    return;
  }
  Impl& s = *impl_;
  s.job = &fn;
  s.pending.store(n_threads_ - 1, std::memory_order_relaxed);
  const uint64_t region = s.epoch.fetch_add(1, std::memory_order_seq_cst) + 1;  // publishes job, pending
  if (s.sleepers.load(std::memory_order_seq_cst) > 0) {
    // Taking the mutex orders us after a worker that is between its epoch check and wait().
    { std::lock_guard<std::mutex> lock(s.mutex); }
    s.wake.notify_all();
  }

  std::exception_ptr own_error;
  try {
    fn(0, n_threads_);
  } catch (...) {
    own_error = std::current_exception();
  }
  // Take over the slots of workers that have not started.
  for (int t = 1; t < n_threads_; ++t)
    if (s.slot_claim(t, region)) s.slot_run(t);

  // Wait for the workers; yield after a while in case the pool is oversubscribed.
  for (long spins = 0; s.pending.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 200000) {
      RF_CPU_RELAX();
    } else {
      std::this_thread::yield();
    }
  }
  s.job = nullptr;

  if (own_error) std::rethrow_exception(own_error);
  if (s.error) {
    std::exception_ptr err;
    std::swap(err, s.error);
    std::rethrow_exception(err);
  }
}

void ThreadPool::parallel_for(long n, const std::function<void(long, long, int)>& fn) {
  if (n <= 0) return;
  if (n_threads_ == 1 || n == 1) {
    fn(0, n, 0);
    return;
  }
  run([&](int t, int nt) {
    // Even split: the first n % nt chunks get one extra index.
    long base = n / nt, extra = n % nt;
    long begin = t * base + (t < extra ? t : extra);
    long end = begin + base + (t < extra ? 1 : 0);
    if (begin < end) fn(begin, end, t);
  });
}

}  // namespace rf
