// threads.h: the threads of the loops: the spin barrier where they meet, one
// OpenMP region per sequence (run_on_threads), how a batch splits into parts, and the
// products by halves.
//
// Part of the cpu backend's compiled loops; recurrence_cpu.cpp includes every part in one
// translation unit and registers the ops. Design notes and measurements: docs/performance.md.

#pragma once

#include "input_term.h"

namespace {

// Where the threads of the forward meet, twice a step at most. It spins (yielding after a
// while) instead of sleeping: the wait is a few microseconds, and a sleeping thread takes
// longer than that to wake. `abort` releases every waiter for good (a thread that failed).
class SpinBarrier {
 public:
  explicit SpinBarrier(int parties) : parties_(parties) {}
  // false once aborted
  bool wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    } else {
      for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
        if (aborted_.load(std::memory_order_relaxed)) return false;
        if (spins < (1 << 14))
          pause();
        else
          std::this_thread::yield();
      }
    }
    return !aborted_.load(std::memory_order_relaxed);
  }
  void abort() { aborted_.store(true, std::memory_order_relaxed); }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  const int parties_;
  std::atomic<int> arrived_{0}, generation_{0};
  std::atomic<bool> aborted_{false};
};

// Both loops split each step's batch rows into this many parts, whatever the number of
// threads: every part's rows of a recurrent product or weight gradient are one GEMM, and the
// batch statistics and column sums combine the parts' in a fixed order, so that results do
// not depend on the thread count (tests/test_cpu_extension.py pins them bit-identical).
constexpr int BATCH_PARTS = 2;

// Runs body(thread) for thread = 0 .. threads - 1 (threads > 1) at once on torch's OpenMP
// threads, in one parallel region. Returns false, having run nothing, where the region has
// fewer threads. A body that throws aborts `barrier` (releasing the others' waits); its
// exception is rethrown.
template <typename Body>
bool run_on_threads(int threads, SpinBarrier& barrier, Body&& body) {
#ifdef _OPENMP
  std::exception_ptr failure;
  std::atomic<bool> failed{false}, too_few{false};
  const at::ThreadLocalState state;  // the caller's (grad mode, dispatch keys), for torch's ops
#pragma omp parallel
  {
    if (omp_get_num_threads() < threads) {
      too_few = true;
    } else if (omp_get_thread_num() < threads) {
      try {
        const at::ThreadLocalStateGuard guard(state);
        body(omp_get_thread_num());
      } catch (...) {
        if (!failed.exchange(true)) failure = std::current_exception();
        barrier.abort();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
  return !too_few;
#else
  (void)threads, (void)barrier, (void)body;
  return false;
#endif
}

// How many parts the batch's rows split into (BATCH_PARTS, or one below 16 rows), and on
// how many threads they run (one inside another parallel region). The halves of a product
// by halves go to two threads even where the rows make one part.
inline std::pair<int, int> parts_and_threads(int64_t batch, const RecurrentProduct& recurrent) {
  const int parts = batch < 16 ? 1 : BATCH_PARTS;
  const int wanted = recurrent.by_halves() ? 2 : parts;
  int threads = 1;
#ifdef _OPENMP
  if (!at::in_parallel_region()) threads = static_cast<int>(std::min<int64_t>(wanted, at::get_num_threads()));
#endif
  return {parts, threads};
}

// Thread `thread` of `threads`' share of a product by halves (half(k) for its halves k): the
// threads meet before it, where wait_before (every row of the operand written), and after it
// (every half formed). False once the barrier is aborted.
template <typename Half>
bool product_halves(SpinBarrier& barrier, int thread, int threads, bool wait_before, Half&& half) {
  const bool meet = threads > 1;
  if (meet && wait_before && !barrier.wait()) return false;
  for (int k = thread; k < 2; k += threads) half(k);
  return !meet || barrier.wait();
}

}  // namespace
