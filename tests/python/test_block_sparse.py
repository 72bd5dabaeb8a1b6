"""block_sparse_attention against dense attention with the equivalent
token mask, and the layout builders against their definitions."""
import pytest
import torch

from attnzoo import layouts, ops
from reference import assert_matches_reference, make_qkv, reference


def token_mask(layout, block_size, Nq, Nk):
    """(Hl, Nq, Nk) bool: the layout expanded to tokens."""
    m = layout.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return m[:, :Nq, :Nk]


CASES = [
    # B, H, Hkv, Nq, Nk, D, block_size, layout builder, options
    (2, 4, 4, 256, 256, 16, 64, lambda nq, nk, H: layouts.local(nq, nk, 1), {}),
    (1, 4, 2, 300, 300, 16, 64, lambda nq, nk, H: layouts.local(nq, nk, 1, causal=True), {"causal": True}),
    (2, 4, 4, 320, 320, 16, 32, lambda nq, nk, H: layouts.bigbird(nq, nk, 1, 1, 2, num_heads=H, seed=3), {}),
    (1, 2, 2, 500, 500, 8, 50, lambda nq, nk, H: layouts.fixed(nq, 3), {"causal": True}),
    (1, 2, 2, 500, 500, 8, 50, lambda nq, nk, H: layouts.strided(nq, 3), {"causal": True}),
    (2, 2, 1, 130, 260, 16, 32, lambda nq, nk, H: torch.rand(H, nq, nk) > 0.6, {"mask": True}),
    (1, 2, 2, 97, 97, 8, 16, lambda nq, nk, H: layouts.longformer(nq, 1, [0, 3]), {}),
    # a row with no block at all: output 0
    (1, 1, 1, 64, 64, 8, 16, lambda nq, nk, H: torch.tensor([[[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0],
                                                               [1, 1, 1, 1]]], dtype=torch.bool), {}),
    # wide runs of neighbouring blocks (merged into tiles of up to 512 keys)
    (1, 2, 2, 1100, 1100, 16, 64, lambda nq, nk, H: layouts.local(nq, nk, 9), {}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:7]}-{sorted(c[8])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_sparse_matches_masked_dense(case, dtype):
    B, H, Hkv, Nq, Nk, D, bs, make_layout, opts = case
    torch.manual_seed(0)
    layout = make_layout(layouts.num_blocks(Nq, bs), layouts.num_blocks(Nk, bs), H)
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, D, dtype=dtype, requires_grad=True, seed=Nq)
    mask = (torch.rand(B, 1, Nq, Nk) > 0.2) if opts.get("mask") else None
    causal = opts.get("causal", False)
    out = ops.block_sparse_attention(q, k, v, layout, bs, causal=causal, mask=mask)
    full_mask = token_mask(layout, bs, Nq, Nk).unsqueeze(0)
    if mask is not None:
        full_mask = full_mask & mask
    ref = reference(q, k, v, mask=full_mask, causal=causal)[0]
    assert_matches_reference(out, ref, (q, k, v), dtype)


def test_block_sparse_gradcheck():
    q, k, v = make_qkv(1, 2, 1, 20, 20, 4, 3, dtype=torch.float64, requires_grad=True, seed=1)
    layout = layouts.bigbird(5, 5, 0, 1, 1, num_heads=2, seed=1)

    def f(q, k, v):
        return ops.block_sparse_attention(q, k, v, layout, 4, causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


def test_block_sparse_opcheck_and_weights():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8, 8, requires_grad=True, seed=2)
    layout = layouts.local(4, 4, 1)
    torch.library.opcheck(torch.ops.attnzoo.attention.default, (q, k, v), {"layout": layout, "block_size": 16})
    torch.library.opcheck(torch.ops.attnzoo.block_sparse_attention.default, (q, k, v, layout, 16), {})
    probs = torch.ops.attnzoo.attention_weights(q, k, v, layout=layout, block_size=16)
    want = reference(q, k, v, mask=token_mask(layout, 16, 64, 64).unsqueeze(0))[2]
    torch.testing.assert_close(probs.double(), want, atol=1e-6, rtol=1e-5)


def test_layout_definitions():
    # local: the band, bottom-right aligned when there are fewer query blocks
    loc = layouts.local(3, 6, 1)[0]
    for i in range(3):
        p = i + 3
        for j in range(6):
            assert bool(loc[i, j]) == (p - 1 <= j <= p + 1)
    # fixed / strided: the Sparse Transformer definitions
    fx = layouts.fixed(12, 4, 2)[0]
    st = layouts.strided(12, 4)[0]
    for i in range(12):
        for j in range(12):
            assert bool(fx[i, j]) == (j <= i and (j // 4 == i // 4 or j % 4 >= 2))
            assert bool(st[i, j]) == (j <= i and (i - j < 4 or (i - j) % 4 == 0))
    # longformer: window plus global rows and columns
    lf = layouts.longformer(8, 1, [2])[0]
    assert lf[2].all() and lf[:, 2].all() and not lf[0, 5]


def test_bigbird_is_seeded_and_has_its_parts():
    a = layouts.bigbird(16, 16, window=1, num_global=2, num_random=3, num_heads=4, seed=7)
    b = layouts.bigbird(16, 16, window=1, num_global=2, num_random=3, num_heads=4, seed=7)
    c = layouts.bigbird(16, 16, window=1, num_global=2, num_random=3, num_heads=4, seed=8)
    assert a.shape == (4, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a[:, :2].all() and a[:, :, :2].all()  # global rows and columns
    base = layouts.local(16, 16, 1)[0].clone()
    base[:2] = True
    base[:, :2] = True
    extra = (a & ~base).sum(-1)  # the random blocks of each row
    assert (extra[:, 2:] == 3).all()


@pytest.mark.parametrize("layout,block_size,fragment", [
    (torch.ones(1, 4, 4, dtype=torch.bool), 0, "block_size must be positive"),
    (torch.ones(1, 3, 4, dtype=torch.bool), 16, "layout must have shape (H or 1, ceil(Nq/block_size)"),
    (torch.ones(3, 4, 4, dtype=torch.bool), 16, "layout must have shape"),
    (torch.ones(1, 4, 4), 16, "layout must be a bool tensor"),
])
def test_block_sparse_bad_input(layout, block_size, fragment):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8, 8)
    with pytest.raises(RuntimeError) as info:
        ops.block_sparse_attention(q, k, v, layout, block_size)
    assert fragment in str(info.value)


@pytest.mark.parametrize("call,fragment", [
    (lambda: layouts.local(0, 4, 1), "num_q_blocks must be positive"),
    (lambda: layouts.fixed(8, 4, 5), "num_summary must be in [1, stride = 4]"),
    (lambda: layouts.longformer(8, 1, [9]), "global block 9 is outside [0, 8)"),
    (lambda: layouts.bigbird(4, 4, num_random=-1), "must be >= 0"),
])
def test_layout_bad_input(call, fragment):
    with pytest.raises(RuntimeError) as info:
        call()
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------
# Token-exact Longformer (window + global tokens): on the CPU one block-sparse
# call with token masks (global keys gathered after the sequence) and the
# global rows; the window larger than N, global tokens inside the window and
# at block edges, N not a multiple of the 64-token block, GQA, a key mask.

def longformer_mask(N, window, global_tokens):
    i = torch.arange(N)
    allowed = (i[:, None] - i[None, :]).abs() <= window
    g = torch.zeros(N, dtype=torch.bool)
    g[list(global_tokens)] = True
    return allowed | g[None, :] | g[:, None]


@pytest.mark.parametrize("N,window,global_tokens", [(300, 16, [0, 5, 299]), (97, 0, [50]), (64, 3, []),
                                                    (513, 40, list(range(0, 513, 100))),
                                                    (200, 500, [3, 63, 64, 127, 128]), (130, 64, list(range(70)))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_longformer_is_exact(N, window, global_tokens, dtype):
    q, k, v = make_qkv(2, 4, 2, N, N, 16, 8, dtype=dtype, requires_grad=True, seed=N)
    key_mask = torch.rand(2, N, generator=torch.Generator().manual_seed(N)) > 0.1
    out = ops.longformer_attention(q, k, v, window, global_tokens, key_mask=key_mask)
    mask = longformer_mask(N, window, global_tokens)[None, None] & key_mask[:, None, None, :]
    ref = reference(q, k, v, mask=mask)[0]
    assert_matches_reference(out, ref, (q, k, v), dtype)


def test_longformer_dropout_is_dropout_on_the_union():
    """The kept fraction of the union's probabilities, and the expectation:
    the mean over many seeds of the dropped output approaches the plain one."""
    q, k, v = make_qkv(1, 2, 2, 130, 130, 8, 8, seed=11)
    plain = ops.longformer_attention(q, k, v, 10, [0, 77])
    runs = torch.stack([ops.longformer_attention(q, k, v, 10, [0, 77], dropout_p=0.3) for _ in range(400)])
    assert not torch.equal(runs[0], runs[1])
    assert (runs.mean(0) - plain).abs().max() < 0.15 * plain.abs().max()


def test_longformer_dropout_gradient_replays_the_forwards_pattern():
    """With dropout the backward must drop exactly what the forward dropped, in
    both engine calls (window rows and global rows): with the generator reset
    before every evaluation the function is deterministic, so gradcheck's
    finite differences test the replay."""
    q, k, v = make_qkv(1, 2, 1, 70, 70, 4, 3, dtype=torch.float64, requires_grad=True, seed=5)

    def dropped(q, k, v):
        torch.manual_seed(123)
        return ops.longformer_attention(q, k, v, 3, [0, 40, 69], dropout_p=0.4)

    assert not torch.equal(dropped(q, k, v), ops.longformer_attention(q, k, v, 3, [0, 40, 69]))
    assert torch.autograd.gradcheck(dropped, (q, k, v), eps=1e-6, atol=1e-7)


def test_longformer_node_keeps_its_inputs_honest():
    """The autograd node saves q, k, v: changing one in place after the forward
    is caught at the backward, as for ATen's own ops. torch.func.vjp, which
    refuses torch::autograd::Function, accepts the plain node; torch.vmap
    falls back to a loop over samples."""
    q, k, v = make_qkv(1, 2, 2, 90, 90, 8, 8, requires_grad=True, seed=6)
    kk = k.detach().clone().requires_grad_()
    k2 = kk * 1.0
    out = ops.longformer_attention(q, k2, v, 5, [7])
    with torch.no_grad():
        k2.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    grad = torch.randn(1, 2, 90, 8)
    _, vjp = torch.func.vjp(lambda q, k, v: ops.longformer_attention(q, k, v, 5, [7, 60]), q, k, v)
    want = torch.autograd.grad(ops.longformer_attention(q, k, v, 5, [7, 60]), (q, k, v), grad)
    for a, b in zip(vjp(grad), want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # torch.vmap has no rule for it and runs it per sample (torch's fallback).
    qs, ks, vs = make_qkv(3, 2, 2, 90, 90, 8, 8, seed=7)
    with pytest.warns(UserWarning, match="not yet implemented the batching rule"):
        mapped = torch.vmap(lambda q, k, v: ops.longformer_attention(q[None], k[None], v[None], 5, [7]))(qs, ks, vs)
    torch.testing.assert_close(mapped[:, 0], ops.longformer_attention(qs, ks, vs, 5, [7]), atol=1e-6, rtol=0)


def test_longformer_gradcheck_and_errors():
    q, k, v = make_qkv(1, 2, 2, 12, 12, 4, 3, dtype=torch.float64, requires_grad=True, seed=3)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.longformer_attention(q, k, v, 2, [0, 7]), (q, k, v),
                                    eps=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="global_tokens must lie in"):
        ops.longformer_attention(q, k, v, 2, [12])
    with pytest.raises(RuntimeError, match="must not repeat"):
        ops.longformer_attention(q, k, v, 2, [1, 1])
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        ops.longformer_attention(q, k, v, -1, [1])
    with pytest.raises(RuntimeError, match="same length"):
        ops.longformer_attention(q[:, :, :5], k, v, 2, [1])


def test_lse_is_differentiable():
    q, k, v = make_qkv(1, 2, 1, 30, 70, 6, 5, dtype=torch.float64, requires_grad=True, seed=4)

    def f(q, k, v):
        return ops.attention(q, k, v, causal=True, return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)
