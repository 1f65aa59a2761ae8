#include "parallel.h"

#include <algorithm>
#include <atomic>

namespace dsa::cpu {
namespace {
std::atomic<uint64_t> threads_seen{0};
}

int openmp_version() {
#ifdef _OPENMP
  return _OPENMP;
#else
  return 0;
#endif
}

uint64_t take_threads_seen() { return threads_seen.exchange(0); }

namespace detail {
void note_thread() {
  const int tid = std::min(at::get_thread_num(), 63);
  threads_seen.fetch_or(uint64_t{1} << tid, std::memory_order_relaxed);
}
}  // namespace detail

}  // namespace dsa::cpu
