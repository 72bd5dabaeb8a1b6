"""Attention operators: thin Python wrappers over ``torch.ops.attnzoo``.

Tensors are (B, H, N, D). Shape inference (meta kernels for torch.compile and FakeTensor) and autograd
are registered in C++ beside the kernels; docs/ops.md gives the exact semantics.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _C  # noqa: F401  registers the ops
from . import _vmap  # noqa: F401  registers the batching rules (torch.vmap)

__all__ = ["attention", "attention_weights", "alibi_slopes", "t5_relative_bucket", "rotary",
           "linformer_attention", "linear_attention", "block_sparse_attention", "shaw_attention",
           "lsh_attention", "longformer_attention"]


def _window(window: Optional[Sequence[int]]):
    if window is None:
        return None
    window = [int(w) for w in window]
    if len(window) != 2:
        raise ValueError(f"attention: window must be (left, right), got {len(window)} values")
    return window


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    causal: bool = False,
    window: Optional[Sequence[int]] = None,
    alibi_slopes: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    t5_table: Optional[Tensor] = None,
    t5_bidirectional: bool = True,
    t5_max_distance: int = 128,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Fused scaled dot-product attention with an online softmax.

    q (B, H, Nq, D); k (B, Hkv, Nk, D); v (B, Hkv, Nk, Dv), H % Hkv == 0 (GQA).

    mask: bool, broadcastable to (B, H, Nq, Nk), True = may attend.
    bias: float, broadcastable to (B, H, Nq, Nk), added to the scaled scores;
        differentiable.
    causal: bottom-right aligned; query i stands at position i + Nk - Nq.
    window: (left, right); key j visible iff p_i - left <= j <= p_i + right.
    alibi_slopes: (H,) or (B, H); adds -slope * |p_i - j|.
    dropout_p: dropout on the probabilities; reproducible under
        ``torch.manual_seed``; the backward regenerates the same pattern.
    scale: defaults to 1/sqrt(D).
    t5_table: (num_buckets, H); adds t5_table[t5_relative_bucket(j - p_i), h]
        inside the kernel (no Nq x Nk bias is built); differentiable. T5
        itself uses scale=1.0.
    return_lse: also return the row log-sum-exp (B, H, Nq) (float32, or
        float64 for float64 inputs; -inf where a row sees no key).

    A query row with no visible key gives output 0 and zero gradient.
    """
    out, lse = torch.ops.attnzoo.attention(
        q, k, v, mask=mask, bias=bias, causal=causal, window=_window(window),
        alibi_slopes=alibi_slopes, dropout_p=float(dropout_p), scale=scale, t5_table=t5_table,
        t5_bidirectional=bool(t5_bidirectional), t5_max_distance=int(t5_max_distance))
    return (out, lse) if return_lse else out


def attention_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    causal: bool = False,
    window: Optional[Sequence[int]] = None,
    alibi_slopes: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    t5_table: Optional[Tensor] = None,
    t5_bidirectional: bool = True,
    t5_max_distance: int = 128,
) -> Tensor:
    """The (B, H, Nq, Nk) probabilities ``attention`` would use (with dropout
    applied when dropout_p > 0). For inspection and plots: it materialises
    Nq x Nk and is not differentiable."""
    return torch.ops.attnzoo.attention_weights(
        q, k, v, mask=mask, bias=bias, causal=causal, window=_window(window),
        alibi_slopes=alibi_slopes, dropout_p=float(dropout_p), scale=scale, t5_table=t5_table,
        t5_bidirectional=bool(t5_bidirectional), t5_max_distance=int(t5_max_distance))


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi paper's per-head slopes, float32 of shape (num_heads,)."""
    return torch.ops.attnzoo.alibi_slopes(int(num_heads))


def t5_relative_bucket(relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32,
                       max_distance: int = 128) -> Tensor:
    """T5's bucket of each relative position (memory - query), exactly as HF
    transformers' ``T5Attention._relative_position_bucket``; int64."""
    return torch.ops.attnzoo.t5_relative_bucket(relative_position, bidirectional, int(num_buckets),
                                                int(max_distance))


def rotary(x: Tensor, positions: Optional[Tensor] = None, offset: int = 0, base: float = 10000.0,
           rotary_dim: Optional[int] = None, interleaved: bool = False) -> Tensor:
    """Rotary position embedding of x (..., N, D).

    Feature pairs are rotated by (position + offset) * base^(-2i/rotary_dim):
    half-split pairs (i, i + rotary_dim/2) as in GPT-NeoX / LLaMA, or adjacent
    pairs (2i, 2i+1) as in GPT-J when ``interleaved``. ``positions`` is (N,) or
    (B, N) integers (default 0..N-1); ``offset`` shifts them (decoding with a
    KV cache). Features past ``rotary_dim`` (default D) pass through.
    """
    return torch.ops.attnzoo.rotary(x, positions, int(offset), float(base), rotary_dim, bool(interleaved))


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Optional[Tensor] = None, *,
                        key_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                        scale: Optional[float] = None, causal: bool = False) -> Tensor:
    """Linformer attention: k and v are projected along the sequence with
    E[:, :Nk] and F[:, :Nk] ((Kp, Nmax); F defaults to E), then fused
    attention runs over the Kp projected keys. Keys where ``key_mask`` (B, Nk)
    is False are zeroed before the projection. ``causal=True`` is refused:
    the projection mixes future keys into every projected key."""
    return torch.ops.attnzoo.linformer_attention(q, k, v, E, F, key_mask=key_mask,
                                                 dropout_p=float(dropout_p), scale=scale, causal=bool(causal))


def shaw_attention(q: Tensor, k: Tensor, v: Tensor, rel_k: Tensor, rel_v: Optional[Tensor] = None,
                   max_distance: int = 16, *, mask: Optional[Tensor] = None, causal: bool = False,
                   dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """Shaw et al. (2018) relative position attention, fused: with
    r = clamp(j - p_i, -K, K) + K and K = ``max_distance``,
    score = (q_i.k_j + q_i.rel_k[r]) * scale and out_i = sum_j p_ij (v_j + rel_v[r]).
    ``rel_k`` (2K+1, D) or (H, 2K+1, D); ``rel_v`` likewise with Dv, or None."""
    return torch.ops.attnzoo.shaw_attention(q, k, v, rel_k, rel_v, int(max_distance), mask=mask,
                                            causal=bool(causal), dropout_p=float(dropout_p), scale=scale)


def lsh_attention(qk: Tensor, v: Tensor, rotations: Tensor, bucket_size: int, *, causal: bool = False,
                  key_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                  return_buckets: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Reformer shared-QK LSH attention, as reformer-pytorch's ``LSHAttention``
    computes it given the same ``rotations`` (D, n_hashes, n_buckets/2) or
    (H, D, n_hashes, n_buckets/2).

    Per hashing round, bucket = argmax([x R, -x R]); positions are sorted by
    (round, bucket, position) and cut into chunks of ``bucket_size`` that
    attend to themselves and the chunk before them (circularly, across
    rounds). Keys are the L2-normalised qk, logits are scaled by D^-1/2, a
    query attends to itself only when nothing else is allowed (logit -5e4),
    ``causal`` compares original positions, and the rounds are combined by
    their log-sum-exp. Any N works (padded internally). ``return_buckets``
    also returns the buckets (B, H, n_hashes, N), int64 in [0, n_buckets).
    """
    out, buckets = torch.ops.attnzoo.lsh_attention(qk, v, rotations, int(bucket_size), causal=bool(causal),
                                                   key_mask=key_mask, dropout_p=float(dropout_p))
    return (out, buckets) if return_buckets else out


def longformer_attention(q: Tensor, k: Tensor, v: Tensor, window: int, global_tokens, *,
                         key_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                         scale: Optional[float] = None) -> Tensor:
    """Longformer self-attention, exact at token level: query i sees the keys
    j with |i - j| <= ``window`` and every global token, and a global token's
    query sees every key. ``global_tokens``: positions (list or 1-D integer
    tensor). Runs as two fused calls, one for every query over its window and
    the global keys (block-sparse with token masks), one for the global
    queries over every key, merged in place by one autograd node; cost
    O(N * (window + globals))."""
    if not isinstance(global_tokens, Tensor):
        global_tokens = torch.tensor(list(global_tokens), dtype=torch.int64)
    return torch.ops.attnzoo.longformer_attention(q, k, v, int(window), global_tokens, key_mask=key_mask,
                                                  dropout_p=float(dropout_p), scale=scale)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: Tensor, block_size: int, *,
                           causal: bool = False, mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                           scale: Optional[float] = None) -> Tensor:
    """Attention over the blocks a layout marks: ``layout`` bool (H or 1,
    ceil(Nq/block_size), ceil(Nk/block_size)). Unmarked blocks are never
    computed, so the cost grows with the number of marked ones. ``causal`` and
    ``mask`` refine within the marked blocks. Builders: :mod:`attnzoo.layouts`."""
    return torch.ops.attnzoo.block_sparse_attention(q, k, v, layout, int(block_size), causal=bool(causal),
                                                    mask=mask, dropout_p=float(dropout_p), scale=scale)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: str = "elu+1", causal: bool = False,
                     key_mask: Optional[Tensor] = None) -> Tensor:
    """Kernelised linear attention (Katharopoulos et al., 2020):
    phi(q_i) sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j)) with
    phi = elu + 1 (or relu). ``causal`` sums over j <= i with prefix sums over
    chunks of 64 (Nq must equal Nk). Keys where ``key_mask`` (B, Nk) is False
    are left out."""
    return torch.ops.attnzoo.linear_attention(q, k, v, feature_map=feature_map, causal=bool(causal),
                                              key_mask=key_mask)
