"""rotary, linformer_attention and linear_attention against references written
here (and HF LLaMA's rotary code as a cross-check)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from attnzoo import ops
from reference import make_qkv, reference


# ---------------------------------------------------------------------------
# rotary

def rotary_reference(x, positions, base=10000.0, rotary_dim=None, interleaved=False):
    """Rotation as complex multiplication, in float64."""
    x = x.double()
    D = x.shape[-1]
    rd = rotary_dim or D
    inv_freq = base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    theta = positions.double().unsqueeze(-1) * inv_freq
    rot = x[..., :rd]
    if interleaved:
        z = torch.complex(rot[..., 0::2], rot[..., 1::2])
    else:
        z = torch.complex(rot[..., : rd // 2], rot[..., rd // 2:])
    z = z * torch.polar(torch.ones_like(theta), theta)
    if interleaved:
        out = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    else:
        out = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([out, x[..., rd:]], dim=-1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_matches_reference(interleaved, rotary_dim, dtype):
    x = torch.randn(2, 3, 50, 16, dtype=dtype)
    got = ops.rotary(x, rotary_dim=rotary_dim, interleaved=interleaved, offset=7)
    want = rotary_reference(x, torch.arange(50) + 7, rotary_dim=rotary_dim, interleaved=interleaved)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)


def test_rotary_per_batch_positions_and_offset_for_decoding():
    x = torch.randn(2, 4, 20, 8)
    pos = torch.stack([torch.arange(20), torch.arange(20) * 3 + 1])
    got = ops.rotary(x, positions=pos)
    torch.testing.assert_close(got.double(), rotary_reference(x, pos.view(2, 1, 20)), atol=1e-5, rtol=0)
    # decoding: the last 5 tokens rotated with offset 15 equal the tail of the full rotation
    torch.testing.assert_close(ops.rotary(x[:, :, 15:], offset=15), ops.rotary(x)[:, :, 15:])


def test_rotary_scores_depend_on_relative_position_only():
    q = torch.randn(1, 1, 1, 32, dtype=torch.float64).expand(1, 1, 40, 32)
    k = torch.randn(1, 1, 1, 32, dtype=torch.float64).expand(1, 1, 40, 32)
    s = ops.rotary(q) @ ops.rotary(k).transpose(-1, -2)
    for d in (-5, 0, 3):
        diag = torch.diagonal(s[0, 0], offset=d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-10, rtol=0)


def test_rotary_matches_hf_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x = torch.randn(2, 4, 30, 16)
    pos = torch.arange(30)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    freqs = pos.float()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    want, _ = llama.apply_rotary_pos_emb(x, x, emb.cos(), emb.sin(), unsqueeze_dim=0)
    torch.testing.assert_close(ops.rotary(x), want, atol=1e-5, rtol=1e-5)


def test_rotary_gradcheck_and_opcheck():
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.rotary(x, rotary_dim=4, interleaved=True), (x,))
    torch.library.opcheck(torch.ops.attnzoo.rotary.default, (x.detach().float(),), {"offset": 3})


@pytest.mark.parametrize("kwargs,fragment", [
    ({"rotary_dim": 5}, "rotary_dim must be even"),
    ({"rotary_dim": 32}, "rotary_dim must be even and in (0, D = 16]"),
    ({"positions": torch.arange(7)}, "positions must have shape (N,) = (10,)"),
    ({"positions": torch.rand(10)}, "positions must be an integer tensor"),
    ({"base": -1.0}, "base must be positive"),
])
def test_rotary_bad_input(kwargs, fragment):
    with pytest.raises(RuntimeError) as info:
        ops.rotary(torch.randn(2, 3, 10, 16), **kwargs)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------
# linformer

def linformer_reference(q, k, v, E, F=None, key_mask=None, scale=None):
    Nk = k.shape[2]
    F = E if F is None else F
    if key_mask is not None:
        keep = key_mask[:, None, :, None]
        k, v = k * keep, v * keep
    kp = E[:, :Nk].double() @ k.double()
    vp = F[:, :Nk].double() @ v.double()
    return reference(q, kp, vp, scale=scale)[0]


@pytest.mark.parametrize("shared", [True, False])
def test_linformer_matches_reference(shared):
    q, k, v = make_qkv(2, 4, 2, 300, 300, 16, 24, seed=1)
    E, F = torch.randn(64, 512) / 20, torch.randn(64, 512) / 20
    key_mask = torch.rand(2, 300) > 0.2
    got = ops.linformer_attention(q, k, v, E, None if shared else F, key_mask=key_mask)
    want = linformer_reference(q, k, v, E, None if shared else F, key_mask=key_mask)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    # a shorter sequence uses the first Nk columns of E
    got = ops.linformer_attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], E)
    torch.testing.assert_close(got.double(), linformer_reference(q[:, :, :100], k[:, :, :100], v[:, :, :100], E),
                               atol=2e-5, rtol=1e-5)


def test_linformer_gradcheck():
    q, k, v = make_qkv(1, 2, 2, 5, 7, 4, 3, dtype=torch.float64, requires_grad=True, seed=2)
    E = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    F = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, E, F: ops.linformer_attention(q, k, v, E, F),
                                    (q, k, v, E, F), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"causal": True}, "causal=True is not supported"),
    ({"E": torch.randn(16, 20)}, "E covers 20 positions (Nmax), but k has 30"),
    ({"F": torch.randn(8, 64)}, "E and F must project to the same Kp"),
    ({"E": torch.randn(16, 64, 2)}, "E must have shape (Kp, Nmax)"),
    ({"key_mask": torch.ones(2, 29, dtype=torch.bool)}, "key_mask must have shape (B, Nk) = (2, 30)"),
])
def test_linformer_bad_input(kwargs, fragment):
    q, k, v = make_qkv(2, 2, 2, 30, 30, 8, 8)
    args = {"E": torch.randn(16, 64)}
    args.update(kwargs)
    E = args.pop("E")
    with pytest.raises(RuntimeError) as info:
        ops.linformer_attention(q, k, v, E, **args)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------
# linear attention

def linear_reference(q, k, v, causal=False, key_mask=None, feature_map="elu+1"):
    phi = (lambda x: torch.nn.functional.elu(x) + 1) if feature_map == "elu+1" else torch.relu
    fq, fk = phi(q.double()), phi(k.double())
    H, Hkv = q.shape[1], k.shape[1]
    fk = fk.repeat_interleave(H // Hkv, 1)
    vv = v.double().repeat_interleave(H // Hkv, 1)
    if key_mask is not None:
        fk = fk * key_mask[:, None, :, None]
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a.tril()
    return (a @ vv) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N", [1, 50, 64, 200])
def test_linear_attention_matches_reference(causal, N):
    q, k, v = make_qkv(2, 4, 2, N, N, 16, 8, seed=N)
    key_mask = torch.rand(2, N) > 0.3
    key_mask[:, 0] = True
    got = ops.linear_attention(q, k, v, causal=causal, key_mask=key_mask)
    torch.testing.assert_close(got.double(), linear_reference(q, k, v, causal, key_mask), atol=1e-5, rtol=1e-4)
    got = ops.linear_attention(q, k, v, causal=causal, feature_map="relu")
    torch.testing.assert_close(got.double(), linear_reference(q, k, v, causal, feature_map="relu"),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_gradcheck(causal):
    q, k, v = make_qkv(1, 2, 1, 70, 70, 3, 2, dtype=torch.float64, requires_grad=True, seed=3)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.linear_attention(q, k, v, causal=causal), (q, k, v),
                                    eps=1e-6, atol=1e-6)


def test_linear_attention_opcheck_and_errors():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 8, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.attnzoo.linear_attention.default, (q, k, v), {"causal": True})
    with pytest.raises(RuntimeError, match='feature_map must be "elu\\+1" or "relu", got "tanh"'):
        ops.linear_attention(q, k, v, feature_map="tanh")
    with pytest.raises(RuntimeError, match="causal linear attention needs Nq == Nk"):
        ops.linear_attention(q[:, :, :5], k, v, causal=True)
    with pytest.raises(RuntimeError, match="multiple of the heads"):
        ops.linear_attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1))


def test_linformer_opcheck():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 8, 8, requires_grad=True)
    E = torch.randn(6, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.attnzoo.linformer_attention.default, (q, k, v, E), {})


def test_causal_linear_core_gradcheck_over_several_chunks_with_gqa_and_key_mask():
    """The fused CPU core (chunks of 64, the state carried across them):
    gradcheck over three chunks, the last one partial, through the feature map,
    the key mask and the GQA repeat around it."""
    q, k, v = make_qkv(1, 2, 1, 150, 150, 3, 2, dtype=torch.float64, requires_grad=True, seed=5)
    key_mask = torch.rand(1, 150) > 0.2
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.linear_attention(q, k, v, causal=True, key_mask=key_mask), (q, k, v), eps=1e-6,
        atol=1e-6)
    fq, fk, v2 = (torch.rand(2, 2, 130, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(torch.ops.attnzoo._causal_linear, (fq, fk, v2), eps=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.attnzoo._causal_linear.default, (fq, fk, v2))


@pytest.mark.parametrize("feature_map,code", [("elu+1", 1), ("relu", 2)])
def test_causal_linear_core_applies_the_feature_map_itself(feature_map, code):
    """Without a key mask or GQA the core maps q and k per chunk: gradcheck
    through it over three chunks, and the same values as mapping first."""
    q, k, v = make_qkv(1, 2, 2, 150, 150, 3, 2, dtype=torch.float64, requires_grad=True, seed=8)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.linear_attention(q, k, v, causal=True,
                                                                         feature_map=feature_map),
                                    (q, k, v), eps=1e-6, atol=1e-6)
    core = torch.ops.attnzoo._causal_linear
    phi = (lambda x: F.elu(x) + 1) if code == 1 else F.relu
    torch.testing.assert_close(core(q, k, v, code), core(phi(q), phi(k), v, 0), atol=1e-12, rtol=1e-12)
    torch.library.opcheck(core.default, (q, k, v, code))
    qs, ks, vs = (torch.randn(3, 1, 2, 70, 4) for _ in range(3))
    batched = torch.vmap(lambda q, k, v: core(q, k, v, code))(qs, ks, vs)
    torch.testing.assert_close(batched, torch.stack([core(qs[i], ks[i], vs[i], code) for i in range(3)]))
    with pytest.raises(RuntimeError, match="feature_map must be 0 \\(none\\), 1 \\(elu\\+1\\) or 2"):
        core(q, k, v, 3)


@pytest.mark.parametrize("N", [1025, 1093, 2048])
def test_causal_linear_backward_over_several_segments(N):
    """The backward keeps the state of every 16th chunk and recomputes the
    others: gradients against the float64 reference over 17, 18 and 32
    chunks (a last segment of one chunk, of two, and full segments)."""
    q, k, v = make_qkv(1, 2, 2, N, N, 4, 3, dtype=torch.float64, requires_grad=True, seed=N)
    grad = torch.randn(1, 2, N, 3, dtype=torch.float64)
    got = torch.autograd.grad(ops.linear_attention(q, k, v, causal=True), (q, k, v), grad)
    want = torch.autograd.grad(linear_reference(q, k, v, causal=True), (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_causal_linear_long_sequence_float32_and_vmap():
    q, k, v = make_qkv(1, 2, 2, 1000, 1000, 16, 8, seed=7)
    got = ops.linear_attention(q, k, v, causal=True)
    torch.testing.assert_close(got.double(), linear_reference(q, k, v, causal=True), atol=1e-5, rtol=1e-4)
    # The core has a batching rule (the vmapped dimension folds into B): no
    # per-sample fallback, forward and backward.
    qs, ks, vs = (torch.rand(3, 1, 2, 100, 8) for _ in range(3))
    core = torch.ops.attnzoo._causal_linear
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        batched = torch.vmap(core, in_dims=(0, None, 0))(qs, ks[0], vs)
        grads = torch.vmap(torch.func.grad(lambda q, k, v: core(q, k, v).sum()))(qs, ks, vs)
    one_by_one = torch.stack([core(qs[i], ks[0], vs[i]) for i in range(3)])
    torch.testing.assert_close(batched, one_by_one)
    torch.testing.assert_close(grads, torch.stack([torch.func.grad(lambda q: core(q, ks[i], vs[i]).sum())(qs[i])
                                                   for i in range(3)]))
    grads = torch.func.grad(lambda q: ops.linear_attention(q, ks[0], vs[0], causal=True).sum())(qs[0])
    q0 = qs[0].clone().requires_grad_()
    ops.linear_attention(q0, ks[0], vs[0], causal=True).sum().backward()
    torch.testing.assert_close(grads, q0.grad)


HUGE_PAGE_PROBE = r"""
import torch
from attnzoo import ops

def advised(t):
    # The flags of the mapping that holds t's middle: "hg" is MADV_HUGEPAGE.
    addr = t.data_ptr() + t.nbytes // 2
    lines = open("/proc/self/smaps").read().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return " hg" in line or line.endswith("hg")
    raise AssertionError("no mapping holds the tensor")

torch.manual_seed(0)
q = torch.randn(1, 8, 16384, 64)  # 32 MiB: from here up glibc maps fresh
kv = torch.randn(1, 8, 16, 64)
out = ops.attention(q, kv, kv)
torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, kv, kv))
qg, kg, vg = (torch.randn(1, 8, 16384, 64, requires_grad=True) for _ in range(3))
lin = ops.linear_attention(qg, kg, vg, causal=True)
lin.backward(torch.randn_like(lin))
small = ops.attention(q[:, :, :1024], kv, kv)  # 2 MiB: left to the allocator
print(advised(out), advised(lin), advised(qg.grad), advised(vg.grad), advised(small))
"""


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="huge-page advice is for Linux kernels with transparent huge pages")
@pytest.mark.parametrize("setting, want", [(None, "True True True True False"), ("0", "False False False False False")])
def test_large_outputs_ask_for_huge_pages(setting, want):
    """Outputs and gradients of 32 MiB and more are advised MADV_HUGEPAGE
    before they are written (their first touch otherwise faults in 4 KiB
    pages); ATTNZOO_HUGE_PAGES=0 turns that off. A fresh process each, so
    glibc's state is its default."""
    env = {k: v for k, v in os.environ.items() if k != "ATTNZOO_HUGE_PAGES"}
    if setting is not None:
        env["ATTNZOO_HUGE_PAGES"] = setting
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want
