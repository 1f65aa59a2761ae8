// How the CPU kernels split their work over threads. ATen's at::parallel_for runs on OpenMP in
// torch's builds, and that OpenMP code is inline header code guarded by _OPENMP: in a file
// compiled without -fopenmp it runs the whole range on the calling thread. setup.py and
// CMakeLists.txt compile with OpenMP and link torch's own runtime; every kernel splits its work
// through parallel_items, which notes the threads that ran it, so a test can check that the
// build really runs in parallel (take_threads_seen) instead of trusting a timing.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace dsa::cpu {

// _OPENMP of the kernels' build (the OpenMP version as yyyymm), 0 when built without OpenMP.
int openmp_version();

// The threads that ran kernel work since the previous call, as a bit mask (bit i: the thread
// at::get_thread_num() == i; thread numbers past 63 share bit 63), and clears the record.
uint64_t take_threads_seen();

namespace detail {
void note_thread();
}

// at::parallel_for(begin, end, grain, f), noting the thread that runs each piece.
template <typename F>
void parallel_items(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    detail::note_thread();
    f(b, e);
  });
}

// Position of work item i when items grow in cost with i (causal query blocks see more keys):
// taken from both ends in turn (0, n-1, 1, n-2, ...), so every contiguous range that
// at::parallel_for hands a thread holds about the same amount of work.
inline int64_t zigzag(int64_t i, int64_t n) { return i % 2 == 0 ? i / 2 : n - 1 - i / 2; }

}  // namespace dsa::cpu
