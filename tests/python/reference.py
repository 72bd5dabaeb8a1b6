"""Shared by the op tests: the float64 attention oracle (explicit scores,
explicit visibility, softmax), input makers and the comparison of outputs and
gradients against the oracle's. A module, not a test file: test files import
this, never each other."""
import math

import torch

def visibility(Nq, Nk, causal=False, window=None):
    pos = torch.arange(Nq).unsqueeze(1) + (Nk - Nq)
    j = torch.arange(Nk).unsqueeze(0)
    allowed = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        allowed &= j <= pos
    if window is not None:
        allowed &= (j >= pos - window[0]) & (j <= pos + window[1])
    return allowed


def reference(q, k, v, mask=None, bias=None, causal=False, window=None, alibi=None, scale=None,
              dropout_keep=None, dropout_p=0.0):
    """Returns (out, lse, probs) in float64."""
    q, k, v = q.double(), k.double(), v.double()
    H, Hkv, Nq, Nk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if alibi is not None:
        pos = torch.arange(Nq).unsqueeze(1) + (Nk - Nq)
        dist = (pos - torch.arange(Nk).unsqueeze(0)).abs().double()
        slopes = alibi.double()
        slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(*slopes.shape, 1, 1)
        s = s - slopes * dist
    allowed = visibility(Nq, Nk, causal, window).expand_as(s)
    if mask is not None:
        allowed = allowed & mask
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if dropout_keep is not None:
        p = p * dropout_keep / (1 - dropout_p)
    return p @ v, lse, p


def assert_matches_reference(out, ref, inputs, dtype, out_atol=2e-5, grad_atol=1e-4):
    """Output and input gradients against the float64 reference's; the
    tolerances given are float32's (float64: 1e-12 and 1e-10)."""
    f32 = dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=out_atol if f32 else 1e-12, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=grad_atol if f32 else 1e-10,
                                   rtol=1e-4 if f32 else 0)


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen)


def make_qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = rand(B, H, Nq, D, dtype=dtype, gen=g)
    k = rand(B, Hkv, Nk, D, dtype=dtype, gen=g)
    v = rand(B, Hkv, Nk, Dv, dtype=dtype, gen=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]
