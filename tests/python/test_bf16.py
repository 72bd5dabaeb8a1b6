"""The CPU engine's bfloat16 passes (products in bfloat16, float32 accumulation)
against the float64 reference, by FlashAttention's rule: the error of the
output and of every gradient is at most twice that of torch SDPA computed in
bfloat16 on the same inputs. Where the CPU has no bfloat16 products the engine
converts to float32 (test_attention.py covers that) and these tests skip."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import layouts, ops
from reference import make_qkv, reference, visibility

pytestmark = pytest.mark.skipif(
    not attnzoo._C.cpu_bf16_engine(),
    reason="this CPU has neither AVX512-BF16 nor AMX: bfloat16 runs through the float32 engine")

BF16 = torch.bfloat16

CASES = [
    # B, H, Hkv, Nq, Nk, D, Dv, options
    (2, 4, 4, 300, 300, 64, 64, {}),
    (1, 2, 2, 1100, 1100, 64, 64, {"causal": True}),   # several forward and backward blocks
    (2, 4, 2, 50, 333, 32, 48, {"causal": True}),      # GQA, Nq < Nk, Dv != D
    (1, 2, 2, 257, 333, 128, 128, {}),                 # odd lengths: padded VNNI pairs
    (1, 2, 2, 600, 600, 32, 32, {"window": (100, 20)}),
    (2, 2, 2, 70, 90, 16, 16, {"mask": "key_padding"}),
    (2, 4, 4, 33, 280, 16, 16, {"bias": (4, 33, 280)}),
    (1, 4, 4, 300, 300, 32, 32, {"alibi": True, "causal": True}),
]


def inputs(case, seed):
    B, H, Hkv, Nq, Nk, D, Dv, opts = case
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=BF16, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    kw = {}
    if opts.get("mask") == "key_padding":
        kw["mask"] = torch.rand(B, 1, 1, Nk, generator=g) > 0.3
    if "bias" in opts:
        kw["bias"] = torch.randn(*opts["bias"], generator=g).to(BF16)
    if opts.get("alibi"):
        kw["alibi_slopes"] = ops.alibi_slopes(H)
    for key in ("causal", "window"):
        if key in opts:
            kw[key] = opts[key]
    return (q, k, v), kw


def sdpa_mask(kw, q, k):
    """The options as one additive bfloat16 mask for SDPA (or None)."""
    Nq, Nk = q.shape[2], k.shape[2]
    allowed = visibility(Nq, Nk, kw.get("causal", False), kw.get("window"))
    if "mask" in kw:
        allowed = allowed & kw["mask"]
    add = torch.zeros(1, dtype=torch.float32)
    if "bias" in kw:
        add = add + kw["bias"].float()
    if "alibi_slopes" in kw:
        pos = torch.arange(Nq).unsqueeze(1) + (Nk - Nq)
        dist = (pos - torch.arange(Nk).unsqueeze(0)).abs().float()
        add = add - kw["alibi_slopes"].view(-1, 1, 1) * dist
    return add.masked_fill(~allowed, float("-inf")).to(BF16)


def errors(run, qkv, grad, want, extra=()):
    leaves = [t.detach().clone().requires_grad_() for t in (*qkv, *extra)]
    out = run(*leaves)
    got = (out, *torch.autograd.grad(out, leaves, grad))
    return [(a.double() - b).abs().max().item() for a, b in zip(got, want)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:7]}-{sorted(c[7])}")
def test_bf16_error_at_most_twice_sdpa_bf16(case):
    (q, k, v), kw = inputs(case, seed=sum(case[:7]))
    H, Hkv = q.shape[1], k.shape[1]
    bias = kw.pop("bias", None)
    extra = () if bias is None else (bias,)
    grad = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(5)).to(BF16)

    leaves = [t.double().requires_grad_() for t in (q, k, v, *extra)]
    ref_kw = {("alibi" if key == "alibi_slopes" else key): val for key, val in kw.items()}
    ref = reference(*leaves[:3], bias=leaves[3] if bias is not None else None, **ref_kw)[0]
    want = (ref, *torch.autograd.grad(ref, leaves, grad.double()))

    def ours(q, k, v, *b):
        return ops.attention(q, k, v, bias=b[0] if b else None, **kw)

    def baseline(q, k, v, *b):
        m = sdpa_mask({**kw, **({"bias": b[0]} if b else {})}, q, k)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=H != Hkv)

    mine = errors(ours, (q, k, v), grad, want, extra)
    theirs = errors(baseline, (q, k, v), grad, want, extra)
    names = ["out", "dq", "dk", "dv", "dbias"]
    for name, a, b in zip(names, mine, theirs):
        assert a <= 2 * b, f"{name}: error {a:.3g} > 2 x SDPA bfloat16's {b:.3g}"


@pytest.mark.parametrize("builder, block_size, causal", [
    (lambda n, H: layouts.bigbird(n, n, 1, 1, 2, num_heads=H, seed=3), 32, False),
    (lambda n, H: layouts.local(n, n, 2, causal=True), 64, True),
    (lambda n, H: layouts.longformer(n, 1, [0, 3]), 16, False),
])
def test_bf16_block_sparse_error_at_most_twice_sdpa_bf16(builder, block_size, causal):
    B, H, N, D = 2, 4, 400, 64
    q, k, v = make_qkv(B, H, H, N, N, D, D, dtype=BF16, seed=12)
    layout = builder(-(-N // block_size), H)  # the builders count blocks
    blocks = layout.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :N, :N]
    allowed = blocks & visibility(N, N, causal)
    grad = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(6)).to(BF16)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, mask=allowed)[0]
    want = (ref, *torch.autograd.grad(ref, leaves, grad.double()))
    mine = errors(lambda q, k, v: ops.block_sparse_attention(q, k, v, layout, block_size, causal=causal),
                  (q, k, v), grad, want)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).to(BF16)
    theirs = errors(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
                    (q, k, v), grad, want)
    for name, a, b in zip(["out", "dq", "dk", "dv"], mine, theirs):
        assert a <= 2 * b, f"{name}: error {a:.3g} > 2 x SDPA bfloat16's {b:.3g}"


def test_bf16_dropout_and_t5_follow_the_float32_path():
    """Dropout (regenerated in the backward) and the T5 table have no SDPA
    counterpart: the bfloat16 passes agree with float32 on the same inputs."""
    q, k, v = make_qkv(1, 4, 4, 300, 300, 32, 32, dtype=BF16, seed=21)
    table = torch.randn(32, 4, dtype=BF16)
    grad = torch.randn(1, 4, 300, 32).to(BF16)
    results = []
    for dtype in (BF16, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, table)]
        torch.manual_seed(7)
        out = ops.attention(*leaves[:3], dropout_p=0.2, t5_table=leaves[3], causal=True)
        results.append((out, *torch.autograd.grad(out, leaves, grad.to(dtype))))
    for name, a, b in zip(["out", "dq", "dk", "dv", "dtable"], *results):
        scale = b.abs().max().item()
        err = (a.float() - b).abs().max().item()
        assert err <= 0.02 * scale, f"{name}: bfloat16 vs float32 {err:.3g} (scale {scale:.3g})"


def test_bf16_outputs_and_fallbacks():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, dtype=BF16, requires_grad=True, seed=3)
    out, lse = ops.attention(q, k, v, return_lse=True)
    assert out.dtype == BF16 and lse.dtype == torch.float32
    out.float().sum().backward()
    assert q.grad.dtype == BF16 and k.grad.dtype == BF16 and v.grad.dtype == BF16
    # Odd head dims and Shaw go through the float32 engine: still correct.
    q, k, v = make_qkv(1, 2, 2, 40, 40, 15, 13, dtype=BF16, seed=4)
    torch.testing.assert_close(ops.attention(q, k, v).double(), reference(q, k, v)[0], atol=2e-2, rtol=0)
    rel = torch.randn(2 * 4 + 1, 16, dtype=BF16)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, dtype=BF16, seed=5)
    assert ops.shaw_attention(q, k, v, rel, max_distance=4).dtype == BF16


def test_bf16_engine_can_be_switched_off():
    code = "import attnzoo; print(attnzoo._C.cpu_bf16_engine())"
    env = dict(os.environ, ATTNZOO_CPU_BF16="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
