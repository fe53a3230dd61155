// Work shared between the calling thread and tasks on XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace gpt2jax {

// Items [0, items) in chunks of `per_chunk`, claimed from a shared counter by the caller and by up to
// `workers - 1` pool tasks; a task that starts after the last chunk is claimed does nothing, so the caller
// never waits on a task that has not begun. fn(begin, end) must be safe to run concurrently.
template <typename Fn>
void ParallelChunks(xla::ffi::ThreadPool& pool, int64_t items, int64_t per_chunk, int64_t workers, Fn fn) {
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto work = std::make_shared<Work>();
  const int64_t chunks = (items + per_chunk - 1) / per_chunk;
  auto run = [=] {
    for (;;) {
      int64_t c = work->next.fetch_add(1);
      if (c >= chunks) return;
      fn(c * per_chunk, std::min(items, (c + 1) * per_chunk));
      work->done.fetch_add(1);
    }
  };
  for (int64_t i = 1; i < workers && i < chunks; ++i) pool.Schedule([run] { run(); });
  run();
  while (work->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// About eight chunks a worker (the pool's threads and the caller), so that uneven items even out.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Fn fn) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads() + 1, items));
  const int64_t per_chunk = std::max<int64_t>(1, items / (workers * 8));
  ParallelChunks(pool, items, per_chunk, workers, fn);
}

}  // namespace gpt2jax
