"""shaw_attention (relative keys and values inside the fused kernel) against
an explicit float64 reference that gathers rel_k / rel_v per (i, j)."""
import pytest
import torch

from attnzoo import ops
from reference import assert_matches_reference, make_qkv


def shaw_reference(q, k, v, rel_k, rel_v, K, causal=False, mask=None, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    H, Nq, Nk, D = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    k = k.repeat_interleave(H // k.shape[1], 1)
    v = v.repeat_interleave(H // v.shape[1], 1)
    scale = D ** -0.5 if scale is None else scale
    pos = torch.arange(Nq)[:, None] + (Nk - Nq)
    r = (torch.arange(Nk)[None, :] - pos).clamp(-K, K) + K  # (Nq, Nk)

    def per_head(t):
        t = t.double()
        return t if t.dim() == 3 else t.unsqueeze(0).expand(H, -1, -1)

    s = (q @ k.transpose(-1, -2) + torch.einsum("bhid,hijd->bhij", q, per_head(rel_k)[:, r])) * scale
    allowed = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        allowed = allowed & (torch.arange(Nk)[None, :] <= pos)
    if mask is not None:
        allowed = allowed & mask
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    out = p @ v
    if rel_v is not None:
        out = out + torch.einsum("bhij,hijd->bhid", p, per_head(rel_v)[:, r])
    return out


CASES = [
    # B, H, Hkv, Nq, Nk, D, Dv, K, per-head tables, with rel_v, options
    (2, 4, 4, 40, 40, 16, 12, 3, True, True, {}),
    (1, 4, 2, 300, 700, 16, 16, 16, False, True, {"causal": True}),
    (1, 2, 2, 600, 600, 8, 8, 100, True, False, {}),
    (2, 2, 1, 5, 900, 8, 4, 7, False, True, {"causal": True}),
    (1, 2, 2, 130, 130, 8, 8, 0, True, True, {"mask": True}),       # K = 0: one bucket
    (1, 2, 2, 100, 100, 8, 8, 500, True, True, {}),                 # K beyond the sequence
]


def build(case, dtype=torch.float32, requires_grad=False, seed=0):
    B, H, Hkv, Nq, Nk, D, Dv, K, per_head, with_v, opts = case
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=dtype, requires_grad=requires_grad, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    rel_k = torch.randn(*((H,) if per_head else ()), 2 * K + 1, D, dtype=dtype, generator=g)
    rel_v = torch.randn(*((H,) if per_head else ()), 2 * K + 1, Dv, dtype=dtype, generator=g) if with_v else None
    mask = (torch.rand(B, 1, Nq, Nk, generator=g) > 0.3) if opts.get("mask") else None
    for t in (rel_k, rel_v):
        if t is not None:
            t.requires_grad_(requires_grad)
    return q, k, v, rel_k, rel_v, K, opts.get("causal", False), mask


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:8]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shaw_forward_and_gradients(case, dtype):
    q, k, v, rel_k, rel_v, K, causal, mask = build(case, dtype, requires_grad=True, seed=len(str(case)))
    out = ops.shaw_attention(q, k, v, rel_k, rel_v, K, causal=causal, mask=mask)
    ref = shaw_reference(q, k, v, rel_k, rel_v, K, causal, mask)
    inputs = [t for t in (q, k, v, rel_k, rel_v) if t is not None]
    assert_matches_reference(out, ref, inputs, dtype, out_atol=3e-5, grad_atol=3e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_shaw_gradcheck(causal):
    case = (1, 2, 1, 7, 9, 4, 3, 2, True, True, {"causal": causal})
    q, k, v, rel_k, rel_v, K, causal, _ = build(case, torch.float64, requires_grad=True, seed=3)

    def f(q, k, v, rel_k, rel_v):
        return ops.shaw_attention(q, k, v, rel_k, rel_v, K, causal=causal)

    assert torch.autograd.gradcheck(f, (q, k, v, rel_k, rel_v), eps=1e-6, atol=1e-7)


def test_shaw_gradcheck_with_dropout():
    case = (1, 2, 2, 6, 8, 4, 3, 2, False, True, {})
    q, k, v, rel_k, rel_v, K, _, _ = build(case, torch.float64, requires_grad=True, seed=4)

    def f(q, k, v, rel_k, rel_v):
        torch.manual_seed(7)
        return ops.shaw_attention(q, k, v, rel_k, rel_v, K, dropout_p=0.25)

    assert torch.autograd.gradcheck(f, (q, k, v, rel_k, rel_v), eps=1e-6, atol=1e-7)


def test_shaw_weights_and_opcheck():
    case = (1, 2, 2, 30, 40, 8, 8, 4, True, True, {})
    q, k, v, rel_k, rel_v, K, _, _ = build(case, requires_grad=True, seed=5)
    torch.library.opcheck(torch.ops.attnzoo.shaw_attention.default, (q, k, v, rel_k, rel_v, K), {})
    torch.library.opcheck(torch.ops.attnzoo.attention.default, (q, k, v),
                          {"shaw_k": rel_k, "shaw_v": rel_v, "shaw_max_distance": K})
    probs = torch.ops.attnzoo.attention_weights(q, k, v, shaw_k=rel_k, shaw_max_distance=K)
    # with rel_v the output is probs @ v plus the rel_v term
    want = shaw_reference(q, k, v, rel_k, None, K)
    torch.testing.assert_close((probs.double() @ v.double()), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"rel_k": torch.randn(5, 8), "max_distance": 3},
     "rel_k must have shape (2K+1, 8) or (H, 2K+1, 8) with K = max_distance = 3"),
    ({"rel_k": torch.randn(3, 7, 8), "max_distance": 3}, "rel_k must have shape"),
    ({"rel_k": torch.randn(7, 8), "rel_v": torch.randn(7, 5), "max_distance": 3}, "rel_v must have shape (2K+1, 8)"),
    ({"rel_k": torch.randn(7, 8), "max_distance": -3}, "max_distance must be >= 0"),
    ({"rel_k": torch.randn(7, 8).long(), "max_distance": 3}, "rel_k must be a floating tensor"),
])
def test_shaw_bad_input(kwargs, fragment):
    q, k, v = make_qkv(1, 2, 2, 10, 10, 8, 8)
    rel_k = kwargs.pop("rel_k")
    rel_v = kwargs.pop("rel_v", None)
    with pytest.raises(RuntimeError) as info:
        ops.shaw_attention(q, k, v, rel_k, rel_v, **kwargs)
    assert fragment in str(info.value)
