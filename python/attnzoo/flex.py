"""FlexAttention block masks, run (and trained) by attnzoo's block-sparse engine.

``attnzoo.flex_attention(q, k, v, block_mask=bm)`` takes torch's own
``BlockMask`` (from ``torch.nn.attention.flex_attention.create_block_mask``)
and computes what torch's ``flex_attention`` computes with it, forward and
backward, on the CPU, where torch's own has no backward:

- blocks the mask lists as *full* run with no mask at all;
- blocks it lists as *partial* apply its ``mask_mod``, evaluated once per
  call plan for those blocks only (never for the whole Nq x Nk);
- blocks it does not list are never computed.

The plan (the engine's layout, the index of each partial block and its
token mask) is built on the first call and kept on the BlockMask, so a
training loop that reuses one mask pays for ``mask_mod`` once.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["flex_attention", "block_mask_plan"]

_PLAN_ATTR = "_attnzoo_plans"


class BlockMaskPlan:
    """What the engine needs for one BlockMask at one (B, H, Nq, Nk).

    layout (Bl, Hl, ceil(Nq/bs), ceil(Nk/bs)) bool: the blocks computed.
    index  same shape, int32: -1 for a full block, else the row of ``masks``.
    masks  (P, bs, bs) bool: the mask_mod of each partial block (True = may attend).
    block_size: the engine's block, gcd of the BlockMask's (Q, KV) block sizes.
    """

    def __init__(self, layout: Tensor, index: Tensor, masks: Tensor, block_size: int):
        self.layout, self.index, self.masks, self.block_size = layout, index, masks, block_size
        self._copies = {}

    def on(self, device) -> Tuple[Tensor, Tensor, Tensor]:
        """(layout, index, masks) on ``device``: the plan is built on the CPU,
        and its copy on another device is made once and kept."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.layout, self.index, self.masks
        if device not in self._copies:
            self._copies[device] = tuple(t.to(device) for t in (self.layout, self.index, self.masks))
        return self._copies[device]


def _to_dense(num_blocks: Tensor, indices: Tensor, num_cols: int) -> Tensor:
    """(..., rows) counts and (..., rows, max) column lists -> (..., rows, num_cols) bool."""
    used = torch.arange(indices.shape[-1], device=indices.device) < num_blocks.unsqueeze(-1)
    cols = torch.where(used, indices.long(), num_cols)  # unused entries go to a spare column
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.bool, device=indices.device)
    dense.scatter_(-1, cols, True)
    return dense[..., :num_cols]


def _as_4d(t: Tensor, what: str) -> Tensor:
    if t.dim() > 4:
        raise ValueError(f"flex_attention: block_mask.{what} has {t.dim()} dimensions; at most 2 batch "
                         "dimensions (B, H) are supported")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _evaluate_mask_mod(mask_mod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """mask_mod over P blocks: b, h (P,), q_idx (P, bq), kv_idx (P, bk) -> (P, bq, bk) bool.
    vmapped over scalars as torch does, so any mask_mod torch accepts works here."""
    fn = torch.vmap(mask_mod, in_dims=(None, None, None, 0))
    fn = torch.vmap(fn, in_dims=(None, None, 0, None))
    fn = torch.vmap(fn, in_dims=(0, 0, 0, 0))
    out = fn(b, h, q_idx, kv_idx)
    if out.dtype != torch.bool:
        out = out.bool()
    return out.expand(b.shape[0], q_idx.shape[1], kv_idx.shape[1])


def block_mask_plan(block_mask, B: int, H: int, Nq: int, Nk: int) -> BlockMaskPlan:
    """The engine's view of a BlockMask for inputs with B batches, H query
    heads, Nq queries and Nk keys (cached on the BlockMask)."""
    plans = getattr(block_mask, _PLAN_ATTR, None)
    key = (B, H, Nq, Nk)
    if plans is not None and key in plans:
        return plans[key]
    plan = _build_plan(block_mask, B, H, Nq, Nk)
    try:
        if plans is None:
            plans = {}
            setattr(block_mask, _PLAN_ATTR, plans)
        plans[key] = plan
    except AttributeError:  # a BlockMask that takes no attributes is simply not cached
        pass
    return plan


def _build_plan(block_mask, B: int, H: int, Nq: int, Nk: int) -> BlockMaskPlan:
    if tuple(block_mask.seq_lengths) != (Nq, Nk):
        raise ValueError(f"flex_attention: block_mask was made for (Q_LEN, KV_LEN) = "
                         f"{tuple(block_mask.seq_lengths)}, but q and k have Nq = {Nq}, Nk = {Nk}; "
                         "create it with create_block_mask(mask_mod, B, H, Nq, Nk)")
    bq, bk = (int(s) for s in block_mask.BLOCK_SIZE)
    rows, cols = math.ceil(Nq / bq), math.ceil(Nk / bk)
    partial = _as_4d(_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, cols), "kv_num_blocks")
    if block_mask.full_kv_num_blocks is not None:
        full = _as_4d(_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, cols),
                      "full_kv_num_blocks")
    else:
        full = torch.zeros_like(partial)
    if partial.shape[-2] != rows:
        raise ValueError(f"flex_attention: block_mask has {partial.shape[-2]} query blocks, expected "
                         f"ceil(Nq / {bq}) = {rows}")
    Bm, Hm = partial.shape[0], partial.shape[1]
    if Bm not in (1, B) or Hm not in (1, H):
        raise ValueError(f"flex_attention: block_mask has batch shape ({Bm}, {Hm}); it must be (1 or B, 1 or H) "
                         f"= (1 or {B}, 1 or {H})")
    full, partial = full.cpu(), partial.cpu() & ~full.cpu()
    where = partial.nonzero()  # (P, 4): b, h, row, col in the BlockMask's own (Bm, Hm)
    masks = _partial_masks(block_mask.mask_mod, where, bq, bk, Nq, Nk)
    _check_broadcast_dims(block_mask.mask_mod, where, masks, bq, bk, Nq, Nk, B if Bm == 1 else 1,
                          H if Hm == 1 else 1)
    index = torch.full(partial.shape, -1, dtype=torch.int32)
    index[tuple(where.t())] = torch.arange(where.shape[0], dtype=torch.int32)
    return _reblock(partial | full, index, masks, bq, bk, Nq, Nk)


def _check_broadcast_dims(mask_mod, where: Tensor, masks: Tensor, bq: int, bk: int, Nq: int, Nk: int,
                          B: int, H: int) -> None:
    """torch calls mask_mod with the real batch and head indices even where a
    BlockMask broadcasts over them (made with B=None or H=None); the plan
    evaluates it at index 0 there. Each other batch index (at head 0) and each
    other head (at batch 0) is checked to give the same masks, so a mask_mod
    that depends on b or h is refused rather than answered wrongly."""
    for dim, count, name in ((0, B, "B"), (1, H, "H")):
        for i in range(1, count):
            moved = where.clone()
            moved[:, dim] = i
            if not torch.equal(_partial_masks(mask_mod, moved, bq, bk, Nq, Nk), masks):
                raise ValueError(f"flex_attention: block_mask broadcasts over {name} but its mask_mod depends on "
                                 f"the {'batch' if dim == 0 else 'head'} index ({name} index {i} differs from 0); "
                                 f"create it with create_block_mask(mask_mod, B, H, ...) giving {name}")


def _partial_masks(mask_mod, where: Tensor, bq: int, bk: int, Nq: int, Nk: int) -> Tensor:
    if where.shape[0] == 0:
        return torch.zeros(0, bq, bk, dtype=torch.bool)
    b, h, r, c = where.unbind(1)
    # Positions past the end exist only in the last block; they are clamped so
    # that a mask_mod indexing a length-N tensor stays in range, and the engine
    # never reads them.
    q_idx = (r.unsqueeze(1) * bq + torch.arange(bq)).clamp_(max=Nq - 1)
    kv_idx = (c.unsqueeze(1) * bk + torch.arange(bk)).clamp_(max=Nk - 1)
    return _evaluate_mask_mod(mask_mod, b, h, q_idx, kv_idx).contiguous()


def _reblock(layout: Tensor, index: Tensor, masks: Tensor, bq: int, bk: int, Nq: int, Nk: int) -> BlockMaskPlan:
    """Square engine blocks of g = gcd(bq, bk): each BlockMask block becomes
    (bq/g) x (bk/g) engine blocks, and each partial mask as many sub-masks."""
    g = math.gcd(bq, bk)
    fq, fk = bq // g, bk // g
    if fq > 1 or fk > 1:
        P = masks.shape[0]
        masks = masks.view(P, fq, g, fk, g).permute(0, 1, 3, 2, 4).reshape(P * fq * fk, g, g)
        sub = (torch.arange(fq).view(fq, 1) * fk + torch.arange(fk)).to(torch.int32)  # (fq, fk)
        big = index.repeat_interleave(fq, 2).repeat_interleave(fk, 3)
        tiles = sub.repeat(index.shape[2], index.shape[3])
        index = torch.where(big >= 0, big * (fq * fk) + tiles, big)
        layout = layout.repeat_interleave(fq, 2).repeat_interleave(fk, 3)
    rows, cols = math.ceil(Nq / g), math.ceil(Nk / g)
    layout = layout[:, :, :rows, :cols].contiguous()
    index = index[:, :, :rows, :cols].contiguous()
    return BlockMaskPlan(layout, index, masks.contiguous(), g)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, score_mod=None, block_mask=None, scale: Optional[float] = None,
                   enable_gqa: bool = False, return_lse: bool = False, *, bias: Optional[Tensor] = None,
                   alibi_slopes: Optional[Tensor] = None, t5_table: Optional[Tensor] = None,
                   dropout_p: float = 0.0) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """torch's ``flex_attention`` signature, computed by attnzoo's engine.

    q (B, H, Nq, D); k (B, Hkv, Nk, D); v (B, Hkv, Nk, Dv). ``block_mask``: a
    torch ``BlockMask`` (any BLOCK_SIZE), or None for dense attention.
    ``enable_gqa`` must be True when Hkv < H, as in torch. ``return_lse``
    also returns the row log-sum-exp (natural log, like torch's).

    ``score_mod`` callables are not supported: attnzoo's scores are modified
    inside the engine by named biases, which may be given instead:
    ``bias`` (additive, broadcastable to (B, H, Nq, Nk), differentiable),
    ``alibi_slopes`` (H,), ``t5_table`` (num_buckets, H). ``dropout_p`` is
    attnzoo's (torch's flex has none)."""
    if score_mod is not None:
        raise NotImplementedError(
            "attnzoo.flex_attention: score_mod callables are not supported (the engine modifies scores "
            "in C++, not through a Python function); for an additive bias, ALiBi or a T5 relative bias "
            "pass bias=, alibi_slopes= or t5_table= instead, and express masking through block_mask")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flex_attention: q, k and v must be 4-D (B, H, N, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Nq = q.shape[0], q.shape[1], q.shape[2]
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv != H and not enable_gqa:
        raise ValueError(f"flex_attention: q has {H} heads and k has {Hkv}; pass enable_gqa=True for "
                         "grouped-query attention")
    options = dict(bias=bias, alibi_slopes=alibi_slopes, t5_table=t5_table, dropout_p=float(dropout_p),
                   scale=scale)
    if block_mask is None:
        out, lse = torch.ops.attnzoo.attention(q, k, v, **options)
    else:
        plan = block_mask_plan(block_mask, B, H, Nq, Nk)
        layout, index, masks = plan.on(q.device)
        out, lse = torch.ops.attnzoo.attention(
            q, k, v, layout=layout, block_size=plan.block_size, block_mask_index=index, block_masks=masks,
            **options)
    return (out, lse) if return_lse else out
