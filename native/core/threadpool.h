// A persistent pool of worker threads for fork-join parallel regions.
// Decode runs ~10 parallel regions per layer per token, so a region must cost
// microseconds: workers spin briefly on an atomic epoch before sleeping.
#pragma once
#include <functional>

namespace rf {

class ThreadPool {
 public:
  // n_threads includes the calling thread (n_threads - 1 workers are started).
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(thread_index, n_threads) once on every thread of the pool, the caller
  // being thread 0, and returns when all have finished. Not re-entrant: fn must not call run().
  void run(const std::function<void(int, int)>& fn);

  // Splits [0, n) into contiguous chunks, one per thread: fn(begin, end, thread_index).
  void parallel_for(long n, const std::function<void(long, long, int)>& fn);

 private:
  struct Impl;
  // Stops and joins the workers and frees the state (the destructor, and a constructor that fails part way).
  void stop_workers();
  Impl* impl_;
  int n_threads_;
};

}  // namespace rf
