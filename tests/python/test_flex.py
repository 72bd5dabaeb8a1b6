"""attnzoo.flex_attention with torch's own BlockMask: the same forward as
torch's flex_attention (its eager path; the compiled one is compared in
tools/bench flex), gradients against a float64 dense reference (torch has no
flex backward on the CPU), the plan (full blocks unmasked, mask_mod evaluated
for partial blocks only), and the errors."""
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import attnzoo
from attnzoo import flex

from reference import reference


def causal(b, h, q, kv):
    return q >= kv


def sliding(width):
    def mod(b, h, q, kv):
        return (q >= kv) & (q - kv < width)
    return mod


def documents(doc_ids):
    """doc_ids (B, N): each token attends causally within its own document."""
    def mod(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)
    return mod


def prefix_lm(prefix):
    def mod(b, h, q, kv):
        return (kv < prefix) | (q >= kv)
    return mod


def head_dependent(b, h, q, kv):  # heads see windows of different widths
    return (q >= kv) & (q - kv < 16 * (h + 1))


def torch_flex_eager(q, k, v, bm, **kw):
    with warnings.catch_warnings():  # "flex_attention called without torch.compile()"
        warnings.simplefilter("ignore")
        return torch_flex.flex_attention(q, k, v, block_mask=bm, **kw)


def token_mask(mask_mod, B, H, Nq, Nk):
    """(B, H, Nq, Nk) bool from mask_mod evaluated everywhere (torch's create_mask)."""
    return torch_flex.create_mask(mask_mod, B, H, Nq, Nk, device="cpu")


def make_inputs(B, H, Hkv, Nq, Nk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g, dtype=dtype) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk))]


def doc_ids_for(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 200, (B, N), generator=g)
    return torch.stack([torch.repeat_interleave(torch.arange(N), lengths[b])[:N] for b in range(B)])


CASES = [
    # name, B, H, Hkv, N, D, mask_mod factory, BlockMask B / H (None = broadcast), BLOCK_SIZE
    ("causal", 2, 4, 4, 512, 32, lambda B, N: causal, None, None, 128),
    ("causal-ragged-gqa", 1, 4, 2, 300, 16, lambda B, N: causal, None, None, 128),
    ("sliding", 1, 2, 2, 640, 32, lambda B, N: sliding(100), None, None, 64),
    ("documents", 2, 2, 2, 700, 16, lambda B, N: documents(doc_ids_for(B, N, 1)), "B", None, 128),
    ("prefix-lm-rect-blocks", 1, 2, 2, 384, 16, lambda B, N: prefix_lm(70), None, None, (64, 32)),
    ("per-head", 1, 3, 3, 256, 16, lambda B, N: head_dependent, None, "H", 32),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_equals_torch_flex_and_gradients_match_float64(case):
    name, B, H, Hkv, N, D, make_mod, mb, mh, block = case
    mod = make_mod(B, N)
    bm = torch_flex.create_block_mask(mod, B if mb else None, H if mh else None, N, N, device="cpu",
                                      BLOCK_SIZE=block)
    q, k, v = make_inputs(B, H, Hkv, N, N, D, seed=len(name))
    gqa = Hkv != H
    out, lse = attnzoo.flex_attention(q, k, v, block_mask=bm, enable_gqa=gqa, return_lse=True)
    want, aux = torch_flex_eager(q, k, v, bm, enable_gqa=gqa, return_aux=torch_flex.AuxRequest(lse=True))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, aux.lse, atol=1e-5, rtol=1e-5)

    # Gradients (torch's flex raises "does not support backward on CPU") in
    # float64 against the dense reference with mask_mod evaluated everywhere.
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64 = attnzoo.flex_attention(q64, k64, v64, block_mask=bm, enable_gqa=gqa)
    grad = torch.randn_like(out64)
    got = torch.autograd.grad(out64, (q64, k64, v64), grad)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(qr, kr, vr, mask=token_mask(mod, B, H, N, N))[0]
    torch.testing.assert_close(out64, ref, atol=1e-10, rtol=1e-10)
    expected = torch.autograd.grad(ref, (qr, kr, vr), grad)
    for g_got, g_want in zip(got, expected):
        torch.testing.assert_close(g_got, g_want, atol=1e-9, rtol=1e-9)


def test_plan_runs_full_blocks_unmasked_and_evaluates_partial_blocks_only():
    N, bs = 1024, 128
    bm = torch_flex.create_block_mask(causal, None, None, N, N, device="cpu", BLOCK_SIZE=bs)
    plan = flex.block_mask_plan(bm, 1, 1, N, N)
    nb = N // bs
    assert plan.block_size == bs
    assert torch.equal(plan.layout[0, 0], torch.ones(nb, nb, dtype=torch.bool).tril())
    # Only the diagonal blocks are partial; the rest of the lower triangle is full (-1).
    diagonal = torch.eye(nb, dtype=torch.bool)
    assert torch.equal(plan.index[0, 0] >= 0, diagonal)
    assert plan.masks.shape == (nb, bs, bs)
    assert torch.equal(plan.masks[0], torch.ones(bs, bs, dtype=torch.bool).tril())
    assert flex.block_mask_plan(bm, 1, 1, N, N) is plan  # built once per BlockMask and shape


def test_full_blocks_skip_the_mask_mod():
    """A BlockMask that calls a block full is taken at its word, as torch's
    compiled kernel does (its eager path evaluates mask_mod everywhere): a
    mask_mod that disagrees is not applied there."""
    N, bs = 256, 64
    dense = torch.ones(1, 1, N // bs, N // bs, dtype=torch.bool).tril()
    num, idx = dense.sum(-1).int(), torch.argsort(dense.int(), dim=-1, descending=True, stable=True).int()
    bm = torch_flex.BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=bs,
                                             mask_mod=lambda b, h, q, kv: q < 0)  # all False
    q, k, v = make_inputs(1, 1, 1, N, N, 16)
    out = attnzoo.flex_attention(q, k, v, block_mask=bm)
    block_causal = dense[0, 0].repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    torch.testing.assert_close(out, reference(q, k, v, mask=block_causal)[0].float(), atol=1e-5, rtol=1e-5)


def test_unlisted_blocks_are_never_computed_and_empty_rows_give_zero():
    N, bs = 256, 64
    bm = torch_flex.create_block_mask(lambda b, h, q, kv: (q >= 64) & (q >= kv), None, None, N, N,
                                      device="cpu", BLOCK_SIZE=bs)
    q, k, v = make_inputs(1, 2, 2, N, N, 16)
    out, lse = attnzoo.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    assert torch.equal(out[:, :, :64], torch.zeros_like(out[:, :, :64]))
    assert torch.isinf(lse[:, :, :64]).all() and (lse[:, :, :64] < 0).all()
    want = torch_flex_eager(q, k, v, bm)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_named_biases_and_gradients_with_a_block_mask():
    B, H, N, D = 1, 4, 320, 16
    bm = torch_flex.create_block_mask(sliding(64), None, None, N, N, device="cpu", BLOCK_SIZE=64)
    q, k, v = (t.double().requires_grad_() for t in make_inputs(B, H, H, N, N, D, seed=5))
    slopes = attnzoo.alibi_slopes(H).double()
    bias = torch.randn(1, H, N, N, dtype=torch.float64, requires_grad=True)
    out = attnzoo.flex_attention(q, k, v, block_mask=bm, alibi_slopes=slopes, bias=bias)
    want = reference(q, k, v, mask=token_mask(sliding(64), 1, 1, N, N), bias=bias, alibi=slopes)[0]
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), grad)
    expected = torch.autograd.grad(want, (q, k, v, bias), grad)
    for g_got, g_want in zip(got, expected):
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-10)

    small = torch_flex.create_block_mask(causal, None, None, 24, 24, device="cpu", BLOCK_SIZE=8)
    q, k, v = (t.double().requires_grad_() for t in make_inputs(1, 1, 1, 24, 24, 4, seed=6))
    b = torch.randn(1, 1, 24, 24, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda q, k, v, b: attnzoo.flex_attention(q, k, v, block_mask=small, bias=b),
                             (q, k, v, b))


def test_no_block_mask_is_dense_attention():
    q, k, v = make_inputs(2, 2, 2, 100, 100, 16)
    torch.testing.assert_close(attnzoo.flex_attention(q, k, v), attnzoo.attention(q, k, v))


def test_errors_name_the_argument():
    N = 128
    bm = torch_flex.create_block_mask(causal, None, None, N, N, device="cpu", BLOCK_SIZE=64)
    q, k, v = make_inputs(1, 4, 2, N, N, 16)
    with pytest.raises(NotImplementedError, match="score_mod.*bias=, alibi_slopes= or t5_table="):
        attnzoo.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s, block_mask=bm, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attnzoo.flex_attention(q, k, v, block_mask=bm)
    other = torch_flex.create_block_mask(causal, None, None, 2 * N, 2 * N, device="cpu", BLOCK_SIZE=64)
    with pytest.raises(ValueError, match=r"made for \(Q_LEN, KV_LEN\) = \(256, 256\).*Nq = 128"):
        attnzoo.flex_attention(q, k, v, block_mask=other, enable_gqa=True)
    per_head = torch_flex.create_block_mask(head_dependent, None, None, N, N, device="cpu", BLOCK_SIZE=32)
    with pytest.raises(ValueError, match="broadcasts over H but its mask_mod depends on the head index"):
        attnzoo.flex_attention(q, k, v, block_mask=per_head, enable_gqa=True)


def test_engine_options_are_checked():
    q, k, v = make_inputs(1, 2, 2, 64, 64, 16)
    layout = torch.ones(1, 2, 2, dtype=torch.bool)
    index = torch.full((1, 2, 2), -1, dtype=torch.int32)
    masks = torch.ones(1, 32, 32, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="block_masks needs a layout"):
        torch.ops.attnzoo.attention(q, k, v, block_masks=masks, block_mask_index=index)
    with pytest.raises(RuntimeError, match="block_mask_index must be an int32 tensor"):
        torch.ops.attnzoo.attention(q, k, v, layout=layout, block_size=32, block_masks=masks,
                                    block_mask_index=index.long())
    with pytest.raises(RuntimeError, match=r"block_masks must have shape \(P, block_size, block_size\)"):
        torch.ops.attnzoo.attention(q, k, v, layout=layout, block_size=32, block_masks=masks[:, :16],
                                    block_mask_index=index)
    with pytest.raises(RuntimeError, match=r"block_mask_index entries must lie in \[-1, 1\)"):
        torch.ops.attnzoo.attention(q, k, v, layout=layout, block_size=32, block_masks=masks,
                                    block_mask_index=index + 5)
    with pytest.raises(RuntimeError, match="block_mask_index must have the layout's shape"):
        torch.ops.attnzoo.attention(q, k, v, layout=layout, block_size=32, block_masks=masks,
                                    block_mask_index=index[:, :1])
    torch.library.opcheck(torch.ops.attnzoo.attention.default, (q, k, v),
                          {"layout": layout, "block_size": 32, "block_masks": masks, "block_mask_index": index})


def test_vmap_over_inputs_with_a_per_batch_block_mask():
    """A BlockMask with its own batch dimension gives a 4-D layout; vmap folds
    the samples into the batch and the layout must follow them."""
    V, B, H, N, D = 3, 2, 2, 256, 16
    bm = torch_flex.create_block_mask(documents(doc_ids_for(B, N, 3)), B, None, N, N, device="cpu", BLOCK_SIZE=64)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(V, B, H, N, D, generator=g) for _ in range(3))
    got = torch.vmap(lambda q, k, v: attnzoo.flex_attention(q, k, v, block_mask=bm))(q, k, v)
    want = torch.stack([attnzoo.flex_attention(q[i], k[i], v[i], block_mask=bm) for i in range(V)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
