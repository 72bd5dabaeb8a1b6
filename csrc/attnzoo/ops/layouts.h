#pragma once
// Block layouts for block_sparse_attention: bool tensors (heads, query
// blocks, key blocks), true = computed. Rows are aligned bottom-right like
// the ops: query block i stands at block position i + nk - nq.
// Also Torch ops (torch.ops.attnzoo.layout_<name>) and Python attnzoo.layouts.
#include <ATen/core/Tensor.h>

#include <vector>

namespace attnzoo::layouts {

// Sliding window: key block j visible from query block i at position p iff
// p - window <= j <= p + window (p - window <= j <= p when causal).
at::Tensor local(int64_t num_q_blocks, int64_t num_k_blocks, int64_t window, bool causal = false);

// BigBird: sliding window of `window` blocks each side, the first
// `num_global` blocks global (their rows see everything, every row sees
// them), and `num_random` further random key blocks per row and head, drawn
// from a generator seeded with `seed` (the same seed gives the same layout).
at::Tensor bigbird(int64_t num_q_blocks, int64_t num_k_blocks, int64_t window = 1, int64_t num_global = 1,
                   int64_t num_random = 2, int64_t num_heads = 1, int64_t seed = 0, bool causal = false);

// Sparse Transformer "fixed" pattern (Child et al. 2019) over num_blocks:
// blocks in the same chunk of `stride` blocks, plus the last `num_summary`
// blocks of every chunk; causal keeps j <= i.
at::Tensor fixed(int64_t num_blocks, int64_t stride, int64_t num_summary = 1, bool causal = true);

// Sparse Transformer "strided" pattern: the previous `stride` blocks, and
// every block a multiple of `stride` away; causal keeps j <= i.
at::Tensor strided(int64_t num_blocks, int64_t stride, bool causal = true);

// Longformer at block granularity: a window of `window` blocks each side,
// plus global blocks (their rows see everything, every row sees them). A
// token-level global token is approximated by the block that holds it.
at::Tensor longformer(int64_t num_blocks, int64_t window, const std::vector<int64_t>& global_blocks,
                      bool causal = false);

// A layout's walks at another granularity: which tiles of `tile` queries and
// keys meet a marked block. For layout (S, rows, cols) of blocks `block`
// over Nq queries and Nk keys, and T = ceil(Nq / tile) query tiles, the key
// tiles of query tile t of slice s are key_tiles[key_ptr[s * T + t] ..
// key_ptr[s * T + t + 1]), ascending; query_ptr / query_tiles are the same
// for key tiles. int32, on the layout's device (the CUDA kernels' walks).
struct TileWalks {
  at::Tensor key_ptr, key_tiles, query_ptr, query_tiles;
};
TileWalks tile_walks(const at::Tensor& layout, int64_t block, int64_t Nq, int64_t Nk, int64_t tile);

}  // namespace attnzoo::layouts
