"""attnzoo.ops.attention against the float64 reference (reference.py), gradcheck,
dropout, opcheck, torch.compile, SDPA agreement and bad input."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from attnzoo import ops
from reference import make_qkv, rand, reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [
    # B, H, Hkv, Nq, Nk, D, Dv, options
    (2, 4, 4, 77, 77, 32, 32, {}),
    (1, 2, 2, 300, 300, 64, 64, {"causal": True}),
    (2, 4, 2, 50, 333, 16, 24, {"causal": True}),           # GQA, decode-style Nq < Nk
    (1, 4, 1, 129, 65, 8, 8, {}),                           # MQA, Nq > Nk
    (1, 3, 3, 260, 260, 16, 16, {"window": (31, 7)}),
    (1, 2, 2, 140, 140, 16, 16, {"window": (10, 0), "causal": True}),
    (2, 2, 2, 70, 90, 16, 16, {"mask": "key_padding"}),
    (2, 2, 2, 70, 90, 16, 16, {"mask": "full"}),
    (2, 4, 4, 33, 280, 16, 16, {"bias": (4, 33, 280)}),
    (2, 4, 4, 33, 280, 16, 16, {"bias": (2, 1, 1, 280)}),
    (1, 4, 4, 100, 100, 16, 16, {"alibi": "heads", "causal": True}),
    (2, 4, 4, 100, 100, 16, 16, {"alibi": "batch_heads", "scale": 0.37}),
    (1, 2, 2, 1, 1, 4, 4, {}),                              # N = 1
    (1, 1, 1, 100, 40, 16, 16, {"causal": True}),           # first 60 rows see nothing
    # several query and key blocks of every pass (forward blocks: 256 x 512)
    (1, 2, 1, 800, 1300, 32, 16, {"causal": True, "bias": (1, 1, 800, 1300)}),
    (2, 2, 2, 1000, 1100, 16, 16, {"window": (300, 40), "mask": "key_padding"}),
]


def build_options(opts, B, H, Nq, Nk, dtype, gen):
    kw = {}
    for key, val in opts.items():
        if key == "mask":
            if val == "key_padding":
                m = torch.rand(B, 1, 1, Nk, generator=gen) > 0.3
            else:
                m = torch.rand(B, H, Nq, Nk, generator=gen) > 0.5
            kw["mask"] = m
        elif key == "bias":
            kw["bias"] = rand(*val, dtype=dtype, gen=gen)
        elif key == "alibi":
            s = ops.alibi_slopes(H)
            kw["alibi_slopes"] = s if val == "heads" else s.expand(B, H) * torch.rand(B, 1, generator=gen)
        else:
            kw[key] = val
    return kw


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:7]}-{sorted(c[7])}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(case, dtype):
    B, H, Hkv, Nq, Nk, D, Dv, opts = case
    g = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=dtype, seed=len(str(case)))
    kw = build_options(opts, B, H, Nq, Nk, dtype, g)
    out, lse = ops.attention(q, k, v, return_lse=True, **kw)
    ref_kw = dict(kw)
    ref_kw["alibi"] = ref_kw.pop("alibi_slopes", None)
    ref, ref_lse, _ = reference(q, k, v, **ref_kw)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol * 10, rtol=0)
    assert not out.isnan().any()


@pytest.mark.parametrize("case", [c for c in CASES if c[3] * c[4] <= 1000 * 1100],
                         ids=lambda c: f"{c[:7]}-{sorted(c[7])}")
def test_gradients_match_reference_float32(case):
    B, H, Hkv, Nq, Nk, D, Dv, opts = case
    g = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, Dv, requires_grad=True, seed=3)
    kw = build_options(opts, B, H, Nq, Nk, torch.float32, g)
    if "bias" in kw:
        kw["bias"].requires_grad_(True)
    grad = rand(B, H, Nq, Dv, gen=g)
    inputs = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    got = torch.autograd.grad(ops.attention(q, k, v, **kw), inputs, grad)
    ref_kw = dict(kw)
    ref_kw["alibi"] = ref_kw.pop("alibi_slopes", None)
    want = torch.autograd.grad(reference(q, k, v, **ref_kw)[0], inputs, grad.double())
    for name, a, b in zip("qkvb", got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=1e-4)


GRADCHECK_CASES = [
    (1, 2, 2, 9, 9, 4, 3, {"causal": True}),
    (2, 4, 2, 5, 12, 4, 4, {"causal": True, "bias": (4, 5, 12)}),
    (1, 2, 1, 7, 7, 3, 5, {"window": (2, 1), "alibi": "heads"}),
    (2, 2, 2, 6, 8, 4, 4, {"mask": "full", "bias": (2, 1, 6, 1)}),
    (1, 2, 2, 6, 8, 4, 4, {"bias": (1, 1, 1, 8)}),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"{c[:7]}-{sorted(c[7])}")
def test_gradcheck_float64(case):
    B, H, Hkv, Nq, Nk, D, Dv, opts = case
    g = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=torch.float64, requires_grad=True, seed=9)
    kw = build_options(opts, B, H, Nq, Nk, torch.float64, g)
    inputs = [q, k, v]
    if "bias" in kw:
        bias = kw.pop("bias").requires_grad_(True)
        inputs.append(bias)

    def f(q, k, v, bias=None):
        return ops.attention(q, k, v, bias=bias, **kw)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck is not None  # double backward is not supported (documented)


def test_gradcheck_with_dropout_regenerates_the_pattern():
    q, k, v = make_qkv(1, 2, 2, 6, 9, 4, 4, dtype=torch.float64, requires_grad=True, seed=1)

    def f(q, k, v):
        torch.manual_seed(1234)  # the same pattern on every evaluation
        return ops.attention(q, k, v, dropout_p=0.3, causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


def test_dropout_is_reproducible_and_drops_the_right_fraction():
    q, k, v = make_qkv(2, 4, 4, 128, 256, 16, 16, seed=2)
    torch.manual_seed(0)
    a = ops.attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(0)
    b = ops.attention(q, k, v, dropout_p=0.25)
    c = ops.attention(q, k, v, dropout_p=0.25)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    # The weights with dropout are the undropped probabilities, zeroed at a
    # rate p and scaled by 1/(1-p).
    torch.manual_seed(3)
    pw = ops.attention_weights(q, k, v, dropout_p=0.25)
    p = ops.attention_weights(q, k, v)
    dropped = (pw == 0).double().mean().item()
    assert abs(dropped - 0.25) < 0.01
    kept = pw != 0
    torch.testing.assert_close(pw[kept], p[kept] / 0.75)
    # dropout_p = 1 drops everything
    assert ops.attention(q, k, v, dropout_p=1.0).abs().max().item() == 0.0


def test_dropout_output_matches_the_reference_with_the_same_pattern():
    q, k, v = make_qkv(1, 2, 2, 70, 300, 16, 8, dtype=torch.float64, seed=4)
    torch.manual_seed(42)
    pw = ops.attention_weights(q, k, v, dropout_p=0.4, causal=True)
    torch.manual_seed(42)
    out = ops.attention(q, k, v, dropout_p=0.4, causal=True)
    torch.testing.assert_close(out, pw @ v.double(), atol=1e-12, rtol=0)


def test_fully_masked_rows_are_zero_with_zero_gradient():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, 4, requires_grad=True, seed=5)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[2] = False
    out, lse = ops.attention(q, k, v, mask=mask, return_lse=True)
    assert out[:, :, 2].abs().max().item() == 0.0
    assert torch.isneginf(lse[:, :, 2]).all()
    out.sum().backward()
    assert q.grad[:, :, 2].abs().max().item() == 0.0
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # all rows masked
    out = ops.attention(q, k, v, mask=torch.zeros(8, 8, dtype=torch.bool))
    assert out.abs().max().item() == 0.0


def test_huge_and_tiny_logits_stay_finite():
    q, k, v = make_qkv(1, 2, 2, 64, 300, 16, 16, dtype=torch.float32, seed=6)
    for s in (1e4, 1e-30):
        out, lse = ops.attention(q * s, k, v, return_lse=True)
        ref, ref_lse, _ = reference(q * s, k, v)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_denormal_inputs_stay_finite_and_match():
    q, k, v = make_qkv(1, 2, 2, 40, 90, 16, 16, dtype=torch.float32, seed=16)
    sub = 1e-40  # float32 subnormal range (below 1.2e-38)
    q.requires_grad_(True)
    out = ops.attention(q * sub, k, v, causal=True)  # scores ~1e-40: uniform over the visible keys
    torch.testing.assert_close(out.double(), reference(q * sub, k, v, causal=True)[0], atol=2e-6, rtol=0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    out = ops.attention(q.detach(), k, v * sub)  # subnormal values: the output stays finite and in range
    assert torch.isfinite(out).all() and out.abs().max() <= (v * sub).abs().max()


def test_attention_weights_match_reference():
    q, k, v = make_qkv(2, 4, 2, 70, 300, 8, 8, seed=7)
    bias = rand(4, 70, 300)
    got = ops.attention_weights(q, k, v, causal=True, bias=bias, alibi_slopes=ops.alibi_slopes(4))
    _, _, p = reference(q, k, v, causal=True, bias=bias, alibi=ops.alibi_slopes(4))
    torch.testing.assert_close(got.double(), p, atol=1e-6, rtol=0)


def test_non_contiguous_inputs():
    q, k, v = make_qkv(2, 64, 4, 100, 100, 16, 16, seed=8)  # made as (B, N, H, D) views below
    qt = q.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)[:, :, :, :]
    qs = torch.randn(2, 4, 100, 32)[..., ::2]
    ks = torch.randn(2, 4, 100, 32)[..., 1::2]
    vs = torch.randn(2, 4, 16, 100).transpose(-1, -2)
    assert not qs.is_contiguous() and not vs.is_contiguous() and not qt.is_contiguous()
    for qq, kk, vv in ((qs, ks, vs), (qt, k.repeat(1, 16, 1, 1), v.repeat(1, 16, 1, 1))):
        torch.testing.assert_close(ops.attention(qq, kk, vv).double(), reference(qq, kk, vv)[0],
                                   atol=2e-5, rtol=0)


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v = make_qkv(1, 4, 4, 200, 200, 32, 32, dtype=torch.bfloat16, requires_grad=True, seed=9)
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref, _, _ = reference(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


def test_no_grad_and_inference_mode():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 8, 8, requires_grad=True, seed=10)
    with torch.no_grad():
        a = ops.attention(q, k, v)
    assert a.grad_fn is None
    with torch.inference_mode():
        b = ops.attention(q, k, v)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("case", [
    dict(shape=(2, 4, 4, 128, 128, 64), kw={}, sdpa={}),
    dict(shape=(2, 4, 4, 300, 300, 32), kw={"causal": True}, sdpa={"is_causal": True}),
    dict(shape=(1, 8, 2, 100, 100, 64), kw={}, sdpa={"enable_gqa": True}),
    dict(shape=(2, 4, 4, 64, 96, 16), kw={"mask": "bool"}, sdpa={}),
    dict(shape=(2, 4, 4, 64, 96, 16), kw={"bias": "float"}, sdpa={}),
])
def test_agrees_with_sdpa(case):
    B, H, Hkv, Nq, Nk, D = case["shape"]
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, D, seed=12)
    kw, sdpa = dict(case["kw"]), dict(case["sdpa"])
    if kw.get("mask") == "bool":
        kw["mask"] = sdpa["attn_mask"] = torch.rand(B, 1, Nq, Nk) > 0.2
    if kw.get("bias") == "float":
        kw["bias"] = sdpa["attn_mask"] = torch.randn(B, H, Nq, Nk)
    torch.testing.assert_close(ops.attention(q, k, v, **kw),
                               F.scaled_dot_product_attention(q, k, v, **sdpa), atol=2e-5, rtol=1e-4)


def test_opcheck():
    q, k, v = make_qkv(2, 4, 2, 20, 33, 8, 8, requires_grad=True, seed=13)
    bias = torch.randn(4, 20, 33, requires_grad=True)
    mask = torch.rand(2, 1, 20, 33) > 0.3
    samples = [
        ((q, k, v), {}),
        ((q, k, v), {"causal": True, "bias": bias}),
        ((q, k, v), {"mask": mask, "window": [3, 2], "alibi_slopes": ops.alibi_slopes(4)}),
        ((q.detach(), k.detach(), v.detach()), {"scale": 0.5}),
    ]
    for args, kwargs in samples:
        torch.library.opcheck(torch.ops.attnzoo.attention.default, args, kwargs)
    torch.library.opcheck(torch.ops.attnzoo.attention_weights.default,
                          (q.detach(), k.detach(), v.detach()), {"causal": True})


def test_torch_compile():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, 8, requires_grad=True, seed=14)

    def f(q, k, v):
        return ops.attention(q * 2, k, v, causal=True).sin().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    got = compiled(q, k, v)
    gq = torch.autograd.grad(got, q)[0]
    want = f(q, k, v)
    wq = torch.autograd.grad(want, q)[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gq, wq)


def test_alibi_slopes():
    torch.testing.assert_close(ops.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: 8 geometric + every other slope of the 16-head set
    s12 = ops.alibi_slopes(12)
    s16 = [2.0 ** (-(i + 1) / 2) for i in range(16)]
    torch.testing.assert_close(s12, torch.tensor([2.0 ** -(i + 1) for i in range(8)] + s16[0::2][:4]))
    assert s12.dtype == torch.float32


BAD_INPUTS = [
    # (description, call, expected message fragment)
    ("rank-3 q", lambda q, k, v: ops.attention(q[0], k, v), "q must have shape (B, H, N, D)"),
    ("heads not a multiple", lambda q, k, v: ops.attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)),
     "multiple of the heads"),
    ("k/v heads differ", lambda q, k, v: ops.attention(q, k, v[:, :1]), "k and v must have the same number of heads"),
    ("head dims differ", lambda q, k, v: ops.attention(q, k[..., :8], v), "head dim D"),
    ("k/v lengths differ", lambda q, k, v: ops.attention(q, k, v[:, :, :5]), "same sequence length"),
    ("batch differs", lambda q, k, v: ops.attention(q, k[:1], v[:1]), "same batch size"),
    ("int dtype", lambda q, k, v: ops.attention(q.int(), k.int(), v.int()),
     "q must be float32, float64, bfloat16 or float16"),
    ("mixed dtypes", lambda q, k, v: ops.attention(q, k.double(), v), "one dtype"),
    ("mask shape", lambda q, k, v: ops.attention(q, k, v, mask=torch.ones(10, 7, dtype=torch.bool)),
     "mask of shape (10, 7) is not broadcastable to (B, H, Nq, Nk) = (2, 6, 10, 12)"),
    ("mask dtype", lambda q, k, v: ops.attention(q, k, v, mask=torch.ones(10, 12)), "mask must be a bool tensor"),
    ("bias shape", lambda q, k, v: ops.attention(q, k, v, bias=torch.ones(5, 10, 12)), "bias of shape (5, 10, 12)"),
    ("bias dtype", lambda q, k, v: ops.attention(q, k, v, bias=torch.ones(10, 12, dtype=torch.long)),
     "bias must be a floating"),
    ("nan scale", lambda q, k, v: ops.attention(q, k, v, scale=float("nan")), "scale must be finite"),
    ("inf scale", lambda q, k, v: ops.attention(q, k, v, scale=float("inf")), "scale must be finite"),
    ("dropout > 1", lambda q, k, v: ops.attention(q, k, v, dropout_p=1.5), "dropout_p must be in [0, 1]"),
    ("negative window", lambda q, k, v: ops.attention(q, k, v, window=(-1, 2)), "window sizes must be >= 0"),
    ("window length", lambda q, k, v: ops.attention(q, k, v, window=(1, 2, 3)), "window must be (left, right)"),
    ("alibi shape", lambda q, k, v: ops.attention(q, k, v, alibi_slopes=torch.ones(5)),
     "alibi_slopes must have shape (H,)"),
    ("meta device", lambda q, k, v: ops.attention(q.to("meta"), k.to("meta"), v.to("meta")), ""),
    ("zero head dim", lambda q, k, v: ops.attention(q[..., :0], k[..., :0], v),
     "head dim D of q and k must be positive"),
    ("alibi heads", lambda q, k, v: ops.alibi_slopes(0), "num_heads must be positive"),
]


@pytest.mark.parametrize("desc,call,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(desc, call, fragment):
    q, k, v = make_qkv(2, 6, 2, 10, 12, 16, 16, seed=15)
    if desc == "meta device":
        # The fake kernel answers for meta tensors (shape inference), it does
        # not crash.
        out = call(q, k, v)
        assert out.device.type == "meta" and out.shape == (2, 6, 10, 16)
        return
    with pytest.raises((RuntimeError, ValueError)) as info:
        call(q, k, v)
    assert fragment in str(info.value)


def test_empty_sequences():
    q, k, v = make_qkv(1, 2, 2, 0, 5, 4, 4)
    assert ops.attention(q, k, v).shape == (1, 2, 0, 4)
    q, k, v = make_qkv(1, 2, 2, 3, 0, 4, 4)
    out, lse = ops.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 3, 4) and out.abs().max().item() == 0 and torch.isneginf(lse).all()


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_engine_build_matches_reference(isa):
    """The engine is compiled per instruction set; ATEN_CPU_CAPABILITY picks a
    lower one, so each build is checked on this machine."""
    script = f"""
import torch, attnzoo, sys
sys.path.insert(0, {os.path.join(ROOT, 'tests', 'python')!r})
from reference import reference, make_qkv
assert attnzoo.engine_isa() == {isa.upper()!r}, attnzoo.engine_isa()
q, k, v = make_qkv(2, 4, 2, 150, 290, 32, 24, requires_grad=True, seed=1)
bias = torch.randn(4, 150, 290)
out = attnzoo.attention(q, k, v, causal=True, bias=bias)
ref = reference(q, k, v, causal=True, bias=bias)[0]
torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
g = torch.randn_like(out)
got = torch.autograd.grad(out, (q, k, v), g)
want = torch.autograd.grad(ref, (q, k, v), g.double())
for a, b in zip(got, want):
    torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=1e-4)
print("ok")
"""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("per-ISA builds exist on x86-64 only")
    if isa == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
