"""T5 relative position buckets and the in-kernel T5 bias, against HF
transformers' T5Attention (randomly initialised from a small config, no
download) and against dense attention given the equivalent explicit bias."""
import pytest
import torch

from attnzoo import ops
from reference import make_qkv, reference

T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
T5Config = pytest.importorskip("transformers").T5Config


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 300), (5, 7)])
def test_bucket_matches_hf(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-1000, 1001).view(1, -1).repeat(3, 1) * torch.tensor([[1], [3], [-7]])
    want = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                                 max_distance=max_distance)
    got = ops.t5_relative_bucket(rel, bidirectional, num_buckets, max_distance)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


def t5_layer(heads, num_buckets=32, max_distance=128, is_decoder=False):
    cfg = T5Config(d_model=heads * 8, d_kv=8, num_heads=heads, relative_attention_num_buckets=num_buckets,
                   relative_attention_max_distance=max_distance, is_decoder=is_decoder)
    torch.manual_seed(0)
    layer = T5Attention(cfg, has_relative_attention_bias=True)
    with torch.no_grad():
        layer.relative_attention_bias.weight.normal_()
    return layer


@pytest.mark.parametrize("Nq,Nk,decoder", [(40, 40, False), (300, 300, False), (200, 200, True), (7, 600, True),
                                           (600, 900, False)])
def test_t5_attention_matches_hf_position_bias(Nq, Nk, decoder):
    H = 4
    layer = t5_layer(H, num_buckets=32, max_distance=128, is_decoder=decoder)
    table = layer.relative_attention_bias.weight.detach()  # (num_buckets, H)
    bias = layer.compute_bias(Nq, Nk, past_seen_tokens=Nk - Nq).detach()  # (1, H, Nq, Nk)
    q, k, v = make_qkv(2, H, H, Nq, Nk, 16, 16, seed=Nq)
    out = ops.attention(q, k, v, t5_table=table, t5_bidirectional=not decoder, scale=1.0, causal=decoder)
    ref, _, _ = reference(q, k, v, bias=bias, scale=1.0, causal=decoder)
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=0)
    probs = ops.attention_weights(q, k, v, t5_table=table, t5_bidirectional=not decoder, scale=1.0,
                                  causal=decoder)
    torch.testing.assert_close(probs.double(), reference(q, k, v, bias=bias, scale=1.0, causal=decoder)[2],
                               atol=1e-6, rtol=1e-5)  # float32 with a 20-ulp exp


def explicit_t5_bias(table, Nq, Nk, bidirectional, max_distance):
    pos = torch.arange(Nq).unsqueeze(1) + (Nk - Nq)
    rel = torch.arange(Nk).unsqueeze(0) - pos
    buckets = ops.t5_relative_bucket(rel, bidirectional, table.shape[0], max_distance)
    return table[buckets].permute(2, 0, 1)  # (H, Nq, Nk), differentiable in table


def test_t5_table_gradient_matches_reference():
    H, Nq, Nk = 4, 300, 700
    q, k, v = make_qkv(1, H, 2, Nq, Nk, 16, 16, requires_grad=True, seed=3)
    table = torch.randn(32, H, requires_grad=True)
    grad = torch.randn(1, H, Nq, 16)
    out = ops.attention(q, k, v, t5_table=table, scale=1.0, t5_max_distance=64)
    got = torch.autograd.grad(out, (q, k, v, table), grad)
    ref = reference(q, k, v, bias=explicit_t5_bias(table, Nq, Nk, True, 64), scale=1.0)[0]
    want = torch.autograd.grad(ref, (q, k, v, table), grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("causal,bidirectional", [(False, True), (True, False)])
def test_gradcheck_t5_table(causal, bidirectional):
    q, k, v = make_qkv(2, 2, 1, 6, 9, 4, 3, dtype=torch.float64, requires_grad=True, seed=4)
    table = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, table):
        return ops.attention(q, k, v, t5_table=table, t5_bidirectional=bidirectional, t5_max_distance=10,
                             causal=causal, scale=1.0)

    assert torch.autograd.gradcheck(f, (q, k, v, table), eps=1e-6, atol=1e-7)


def test_t5_with_bias_and_mask_together():
    q, k, v = make_qkv(2, 2, 2, 50, 70, 8, 8, dtype=torch.float64, seed=5)
    table = torch.randn(16, 2, dtype=torch.float64)
    bias = torch.randn(2, 1, 50, 70, dtype=torch.float64)
    mask = torch.rand(2, 1, 1, 70) > 0.2
    out = ops.attention(q, k, v, t5_table=table, t5_max_distance=30, bias=bias, mask=mask)
    ref = reference(q, k, v, bias=bias + explicit_t5_bias(table, 50, 70, True, 30), mask=mask)[0]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_opcheck_with_t5():
    q, k, v = make_qkv(1, 2, 2, 10, 14, 8, 8, requires_grad=True, seed=6)
    table = torch.randn(8, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.attnzoo.attention.default, (q, k, v),
                          {"t5_table": table, "t5_max_distance": 16, "scale": 1.0})


@pytest.mark.parametrize("kwargs,fragment", [
    ({"t5_table": torch.randn(32, 3)}, "t5_table must have shape (num_buckets, H) with H = 2"),
    ({"t5_table": torch.randn(32)}, "t5_table must have shape (num_buckets, H)"),
    ({"t5_table": torch.randn(32, 2).long()}, "t5_table must be a floating tensor"),
    ({"t5_table": torch.randn(32, 2), "t5_max_distance": 8}, "max_distance must exceed the exact range (8)"),
    ({"t5_table": torch.randn(2, 2)}, "t5_table must have at least 4 buckets, got (2, 2)"),
])
def test_bad_t5_arguments(kwargs, fragment):
    q, k, v = make_qkv(1, 2, 2, 10, 14, 8, 8, seed=7)
    with pytest.raises(RuntimeError) as info:
        ops.attention(q, k, v, **kwargs)
    assert fragment in str(info.value)


def test_bucket_rejects_float_positions():
    with pytest.raises(RuntimeError, match="relative_position must be an integer tensor"):
        ops.t5_relative_bucket(torch.randn(4))
