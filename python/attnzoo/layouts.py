"""Block layouts for :func:`attnzoo.block_sparse_attention`.

Each builder returns a bool tensor (heads or 1, query blocks, key blocks);
True marks a block that is computed. Query block i stands at block position
i + num_k_blocks - num_q_blocks (bottom-right aligned, like the ops).
"""
from typing import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  registers the ops

__all__ = ["local", "bigbird", "fixed", "strided", "longformer", "num_blocks"]


def num_blocks(seq_len: int, block_size: int) -> int:
    """ceil(seq_len / block_size): the layout size for a sequence."""
    return -(-int(seq_len) // int(block_size))


def local(num_q_blocks: int, num_k_blocks: int, window: int, causal: bool = False) -> Tensor:
    """Sliding window: key block j visible from position p iff
    p - window <= j <= p + window (j <= p when causal)."""
    return torch.ops.attnzoo.layout_local(num_q_blocks, num_k_blocks, window, causal)


def bigbird(num_q_blocks: int, num_k_blocks: int, window: int = 1, num_global: int = 1, num_random: int = 2,
            num_heads: int = 1, seed: int = 0, causal: bool = False) -> Tensor:
    """BigBird: a window of ``window`` blocks each side, the first
    ``num_global`` blocks global (they see and are seen by every block), and
    ``num_random`` random key blocks per row and head, deterministic given
    ``seed``."""
    return torch.ops.attnzoo.layout_bigbird(num_q_blocks, num_k_blocks, window, num_global, num_random,
                                            num_heads, seed, causal)


def fixed(num_blocks: int, stride: int, num_summary: int = 1, causal: bool = True) -> Tensor:
    """Sparse Transformer 'fixed': the blocks of the same chunk of ``stride``
    blocks, plus the last ``num_summary`` blocks of every chunk."""
    return torch.ops.attnzoo.layout_fixed(num_blocks, stride, num_summary, causal)


def strided(num_blocks: int, stride: int, causal: bool = True) -> Tensor:
    """Sparse Transformer 'strided': the previous ``stride`` blocks and every
    block a multiple of ``stride`` away."""
    return torch.ops.attnzoo.layout_strided(num_blocks, stride, causal)


def longformer(num_blocks: int, window: int, global_blocks: Sequence[int] = (), causal: bool = False) -> Tensor:
    """Longformer at block granularity: a window of ``window`` blocks each
    side plus global blocks (a global token is represented by its block)."""
    return torch.ops.attnzoo.layout_longformer(num_blocks, window, [int(g) for g in global_blocks], causal)
