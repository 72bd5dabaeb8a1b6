#pragma once
// The block-sparse policy: dense modifiers over the blocks a layout marks.
// Compiled once per instruction set (attention_kernel.cpp), so everything
// lives in the ISA-specific inline namespace CPU_CAPABILITY.
#include <algorithm>

#include "attnzoo/ops/cpu/engine/dense_policy.h"

namespace attnzoo::cpu {
inline namespace CPU_CAPABILITY {

// Block-sparse policy: the dense score modifiers, but only the blocks a layout
// marks are visited. Runs of neighbouring blocks merge into one wider tile so
// that the tile products stay large (a local window of three blocks is one
// product, not three). Blocks with a per-block token mask (block_mask_index
// >= 0) apply it on top; the others are computed whole.
template <typename T>
struct BlockSparsePolicy : DensePolicy<T> {
  static constexpr uint32_t kOverrides =
      hooks(Hook::block_q, Hook::block_k, Hook::max_key_tile, Hook::max_query_tile, Hook::for_each_key_tile,
            Hook::for_each_query_tile, Hook::modify_scores);
  using Base = DensePolicy<T>;
  using Base::a;
  int64_t bs;

  explicit BlockSparsePolicy(const DenseArgs& args) : Base(args), bs(args.layout_block) {}

  // Entry (b, h, query block qb, key block kb) of the layout and of block_mask_index.
  int64_t layout_entry(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return b * a.layout_sb + h * a.layout_sh + qb * a.layout_cols + kb;
  }

  void modify_scores(int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t k0, int64_t nk, T* s,
                     int64_t ld) const {
    Base::modify_scores(b, h, q0, mq, k0, nk, s, ld);
    if (!a.block_mask_index) return;
    // A tile spans whole blocks of the layout (runs of them), so each row
    // meets the key blocks [k0 / bs, (k0 + nk - 1) / bs].
    for (int64_t r = 0; r < mq; ++r) {
      const int64_t i = q0 + r, qb = i / bs;
      T* row = s + r * ld;
      for (int64_t kb = k0 / bs; kb * bs < k0 + nk; ++kb) {
        const int32_t p = a.block_mask_index[layout_entry(b, h, qb, kb)];
        if (p < 0) continue;
        const uint8_t* m = a.block_masks + (int64_t(p) * bs + (i - qb * bs)) * bs;
        const int64_t first = std::max(kb * bs, k0), last = std::min((kb + 1) * bs, k0 + nk);
        for (int64_t j = first; j < last; ++j)
          if (!m[j - kb * bs]) row[j - k0] = neg_inf<T>();
      }
    }
  }

  int64_t block_q() const { return bs; }
  int64_t block_k() const { return bs; }
  int64_t max_key_tile() const { return std::max(bs, (kBlockK / bs) * bs); }
  int64_t max_query_tile() const { return std::max(bs, (kBwdBlockQ / bs) * bs); }

  template <class Fn>
  void for_each_key_tile(int64_t b, int64_t h, int64_t q0, int64_t mq, Fn&& fn) const {
    const uint8_t* row = a.layout + layout_entry(b, h, q0 / bs, 0);
    const auto [lo, hi] = Base::key_range(q0, mq);
    emit_runs(row, 1, lo / bs, (hi + bs - 1) / bs, max_key_tile() / bs, a.Nk, fn);
  }
  template <class Fn>
  void for_each_query_tile(int64_t b, int64_t h, int64_t k0, int64_t nk, Fn&& fn) const {
    const uint8_t* col = a.layout + layout_entry(b, h, 0, k0 / bs);
    const auto [lo, hi] = Base::query_range(k0, nk);
    emit_runs(col, a.layout_cols, lo / bs, (hi + bs - 1) / bs, max_query_tile() / bs, a.Nq, fn);
  }

 private:
  // Runs of true entries line[i * stride], i in [first, last), at most
  // max_blocks long, as token ranges (start, length) clipped to n.
  template <class Fn>
  void emit_runs(const uint8_t* line, int64_t stride, int64_t first, int64_t last, int64_t max_blocks,
                 int64_t n, Fn&& fn) const {
    for (int64_t i = first; i < last;) {
      if (!line[i * stride]) {
        ++i;
        continue;
      }
      int64_t j = i + 1;
      while (j < last && j - i < max_blocks && line[j * stride]) ++j;
      fn(i * bs, std::min(j * bs, n) - i * bs);
      i = j;
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace attnzoo::cpu
