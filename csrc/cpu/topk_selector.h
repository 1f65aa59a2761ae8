// Running deterministic top-k of one row, fed in increasing position order: keeps at most 2k
// candidates, compacts to the best k when full and from then on drops any score that cannot
// beat the current k-th best. "Better" = higher score, then lower position, so ties go to the
// lower position; -inf and NaN are never candidates.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace dsa::cpu {

template <typename acc_t>
class TopkSelector {
 public:
  explicit TopkSelector(int64_t k) : k_(k) {}

  void reset() {
    buf_.clear();
    full_ = false;
  }

  struct Entry {
    acc_t score;
    int32_t pos;
  };

  // scores[i] sits at position pos0 + i; positions must increase from call to call.
  void push(const acc_t* scores, int64_t n, int64_t pos0) {
    for (int64_t i = 0; i < n; ++i) push_one(scores[i], pos0 + i);
  }

  // Candidates kept by other selectors over earlier-to-later key ranges (take()'s output, one
  // range after the other): the positions still increase, so the result is what one selector
  // fed every score in order would keep (the best k of a range contain the range's share of
  // the best k overall).
  void push(const std::vector<Entry>& entries) {
    for (const Entry& e : entries) push_one(e.score, e.pos);
  }

  // The kept candidates (at most k), ascending by position, into out.
  void take(std::vector<Entry>& out) {
    if (static_cast<int64_t>(buf_.size()) > k_) compact();
    out.assign(buf_.begin(), buf_.end());
    std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.pos < b.pos; });
  }

  // out[0:k]: the selected positions ascending, then -1.
  void finish(int32_t* out) {
    if (static_cast<int64_t>(buf_.size()) > k_) compact();
    const int64_t n = static_cast<int64_t>(buf_.size());
    for (int64_t i = 0; i < n; ++i) out[i] = buf_[i].pos;
    std::sort(out, out + n);
    std::fill(out + n, out + k_, -1);
  }

 private:
  void push_one(acc_t s, int64_t pos) {
    if (std::isnan(s) || s == -std::numeric_limits<acc_t>::infinity()) return;
    // An equal score arrives at a higher position than every kept one, so it never wins.
    if (full_ && !(s > worst_)) return;
    buf_.push_back({s, static_cast<int32_t>(pos)});
    if (static_cast<int64_t>(buf_.size()) >= 2 * k_) compact();
  }
  static bool better(const Entry& a, const Entry& b) {
    return a.score > b.score || (a.score == b.score && a.pos < b.pos);
  }
  void compact() {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), better);
    buf_.resize(k_);
    worst_ = buf_[k_ - 1].score;
    full_ = true;
  }

  int64_t k_;
  std::vector<Entry> buf_;
  bool full_ = false;
  acc_t worst_ = 0;
};

}  // namespace dsa::cpu
