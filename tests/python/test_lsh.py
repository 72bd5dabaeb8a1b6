"""lsh_attention against reformer-pytorch's LSHAttention given the same random
rotations (compared in float64: in float32 reformer-pytorch's own rounding of
the -5e4 self logits when combining rounds is ~1e-3)."""
import pytest
import torch

from attnzoo import ops

rp = pytest.importorskip("reformer_pytorch.reformer_pytorch")


def reformer(qk, v, rotations, bucket_size, causal=False, input_mask=None, per_head=False):
    """reformer-pytorch's LSHAttention over (B*H, N, D) with our rotations."""
    B, H, N, D = qk.shape
    R, half = rotations.shape[-2], rotations.shape[-1]
    attn = rp.LSHAttention(bucket_size=bucket_size, n_hashes=R, causal=causal,
                           random_rotations_per_head=per_head)
    rot = rotations.reshape(-1, D, R, half)
    if per_head:
        rot = rot.repeat(B, 1, 1, 1)  # reformer's "batch" is B*H
    original = rp.torch.randn
    rp.torch.randn = lambda *shape, **kw: rot
    try:
        mask = None if input_mask is None else input_mask.repeat_interleave(H, 0)
        out, _, buckets = attn(qk.reshape(B * H, N, D), v.reshape(B * H, N, -1), input_mask=mask)
    finally:
        rp.torch.randn = original
    n_buckets = 2 * half
    buckets = buckets.view(B, H, R, N) - (torch.arange(R) * n_buckets).view(1, 1, R, 1)
    return out.view(B, H, N, -1), buckets


def inputs(B, H, N, D, R, n_buckets, per_head=False, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(B, H, N, D, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    v = torch.randn(B, H, N, D, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    rot = torch.randn(*((H,) if per_head else ()), D, R, n_buckets // 2, dtype=torch.float64, generator=g)
    return qk, v, rot


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,H,N,D,bs,R,per_head", [
    (2, 2, 256, 16, 32, 3, False),
    (1, 4, 128, 8, 16, 1, True),
    (1, 2, 512, 32, 64, 4, False),
])
def test_matches_reformer_pytorch(causal, B, H, N, D, bs, R, per_head):
    qk, v, rot = inputs(B, H, N, D, R, N // bs, per_head, seed=N + R, requires_grad=True)
    out, buckets = ops.lsh_attention(qk, v, rot, bs, causal=causal, return_buckets=True)
    want, want_buckets = reformer(qk, v, rot, bs, causal=causal, per_head=per_head)
    assert torch.equal(buckets, want_buckets)
    torch.testing.assert_close(out, want, atol=1e-9, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (qk, v), grad)
    ref = torch.autograd.grad(want, (qk, v), grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_key_mask_and_any_length_match_reformer_on_padded_input():
    # N = 250 pads to 256 = 8 chunks of 32; reformer-pytorch needs the padding
    # done by hand and masked out, which is what the op does inside.
    B, H, N, D, bs, R = 2, 2, 250, 16, 32, 2
    qk, v, rot = inputs(B, H, N, D, R, 8, seed=5, requires_grad=True)
    key_mask = torch.rand(B, N, generator=torch.Generator().manual_seed(1)) > 0.2
    out = ops.lsh_attention(qk, v, rot, bs, key_mask=key_mask)
    pad = 256 - N
    qk_p = torch.nn.functional.pad(qk, (0, 0, 0, pad))
    v_p = torch.nn.functional.pad(v, (0, 0, 0, pad))
    mask_p = torch.nn.functional.pad(key_mask, (0, pad), value=False)
    want, _ = reformer(qk_p, v_p, rot, bs, input_mask=mask_p)
    # reformer masks (query, key) pairs; the op masks keys: the rows of kept
    # queries agree.
    keep = key_mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[keep], want[:, :, :N][keep], atol=1e-9, rtol=0)
    grad = torch.randn_like(out) * keep
    got = torch.autograd.grad(out, (qk, v), grad)
    ref = torch.autograd.grad(want[:, :, :N], (qk, v), grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    qk, v, rot = inputs(1, 2, 13, 4, 2, 4, per_head=True, seed=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda qk, v: ops.lsh_attention(qk, v, rot, 4, causal=causal),
                                    (qk, v), eps=1e-6, atol=1e-7)


def test_dropout_reproducible_and_gradcheck():
    qk, v, rot = inputs(1, 2, 16, 4, 2, 4, seed=3, requires_grad=True)
    torch.manual_seed(0)
    a = ops.lsh_attention(qk, v, rot, 4, dropout_p=0.3)
    torch.manual_seed(0)
    b = ops.lsh_attention(qk, v, rot, 4, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, ops.lsh_attention(qk, v, rot, 4))

    def f(qk, v):
        torch.manual_seed(11)
        return ops.lsh_attention(qk, v, rot, 4, dropout_p=0.3)

    assert torch.autograd.gradcheck(f, (qk, v), eps=1e-6, atol=1e-7)


def test_float32_and_bfloat16():
    qk, v, rot = inputs(1, 2, 200, 16, 2, 8, seed=4)
    want = ops.lsh_attention(qk, v, rot, 32)
    got = ops.lsh_attention(qk.float(), v.float(), rot.float(), 32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
    got = ops.lsh_attention(qk.bfloat16(), v.bfloat16(), rot.float(), 32)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got.float()).all()


def test_opcheck():
    qk, v, rot = inputs(1, 2, 40, 8, 2, 4, seed=6, requires_grad=True)
    torch.library.opcheck(torch.ops.attnzoo.lsh_attention.default, (qk.float(), v.float(), rot.float(), 8),
                          {"causal": True})


@pytest.mark.parametrize("kwargs,fragment", [
    ({"bucket_size": 0}, "bucket_size must be positive"),
    ({"rotations": torch.randn(7, 2, 4)}, "rotations must have shape (D, n_hashes, n_buckets/2)"),
    ({"rotations": torch.randn(3, 8, 2, 4)}, "or (H, D, n_hashes, n_buckets/2) with D = 8, H = 2"),
    ({"key_mask": torch.ones(1, 7, dtype=torch.bool)}, "key_mask must have shape (B, N) = (1, 40)"),
    ({"dropout_p": 1.0}, "dropout_p must be in [0, 1)"),
    ({"v": torch.randn(1, 2, 41, 8)}, "v must match qk in (B, H, N)"),
])
def test_bad_input(kwargs, fragment):
    args = {"qk": torch.randn(1, 2, 40, 8), "v": torch.randn(1, 2, 40, 8), "rotations": torch.randn(8, 2, 4),
            "bucket_size": 8}
    args.update(kwargs)
    with pytest.raises(RuntimeError) as info:
        ops.lsh_attention(args.pop("qk"), args.pop("v"), args.pop("rotations"), args.pop("bucket_size"), **args)
    assert fragment in str(info.value)
