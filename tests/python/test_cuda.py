"""The CUDA kernels against the CPU kernels (the oracle the rest of the suite
checks against float64), run by tools/device-check on a GPU machine.

Skipped where torch sees no CUDA device, or where attnzoo was built without
its CUDA kernels (no toolkit): each skip says which. float32 must match the
CPU kernel to 1e-5 relative; bfloat16 / float16 must stay within twice the
error of torch's SDPA in the same precision against a float64 reference
(FlashAttention's rule).

ATTNZOO_TEST_CUDA_DEVICE=cpu runs the same test code on the CPU against the
CPU (a dry run of the tests themselves, which can then catch nothing about
the kernels: it is how the test code was checked before any GPU ran it)."""
import os

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import ops

DEVICE = os.environ.get("ATTNZOO_TEST_CUDA_DEVICE", "cuda")
DRY_RUN = DEVICE == "cpu"
HAS_DEVICE = DRY_RUN or torch.cuda.is_available()
HAS_KERNELS = DRY_RUN or (HAS_DEVICE and "CUDA" in torch._C._dispatch_dump("attnzoo::attention"))
only_on_gpu = pytest.mark.skipif(DRY_RUN, reason="checks CUDA-only behaviour: not part of the CPU dry run")
pytestmark = [
    pytest.mark.skipif(not HAS_DEVICE, reason="no CUDA device here: tools/device-check runs these on a GPU"),
    pytest.mark.skipif(HAS_DEVICE and not HAS_KERNELS,
                       reason="attnzoo was built without its CUDA kernels (no CUDA toolkit at configure time)"),
]


def fresh(*shape, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(torch.randint(1 << 30, ()).item() if seed is None else seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def qkv(B, H, Hkv, Nq, Nk, D, Dv=None, dtype=torch.float32, seed=0):
    Dv = D if Dv is None else Dv
    return (fresh(B, H, Nq, D, dtype=dtype, seed=seed), fresh(B, Hkv, Nk, D, dtype=dtype, seed=seed + 1),
            fresh(B, Hkv, Nk, Dv, dtype=dtype, seed=seed + 2))


def cuda(*ts):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ts]


def on(device, options):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in options.items()}


def assert_rel(got, want, rtol=1e-5, what="output"):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().clamp_min(1e-30)
    err = ((got - want).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max error {err:.3g} of the largest entry (allowed {rtol:g})"


# Option sets that exercise each rule of the dense policy on CUDA.
def options_for(name, B, H, Nq, Nk, seed=3):
    g = torch.Generator().manual_seed(seed)
    if name == "plain":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"window": (5, 2)}
    if name == "causal_window":
        return {"causal": True, "window": (7, 0)}
    if name == "mask":
        return {"mask": torch.rand(B, 1, Nq, Nk, generator=g) > 0.3}
    if name == "bias":
        return {"bias": torch.randn(B, H, Nq, Nk, generator=g)}
    if name == "key_bias":
        return {"bias": torch.randn(B, 1, 1, Nk, generator=g)}
    if name == "t5":
        return {"t5_table": torch.randn(32, H, generator=g), "scale": 1.0}
    if name == "t5_causal":
        return {"t5_table": torch.randn(32, H, generator=g), "t5_bidirectional": False, "causal": True}
    if name == "alibi":
        return {"alibi_slopes": ops.alibi_slopes(H), "causal": True}
    raise KeyError(name)


KINDS = ["plain", "causal", "window", "causal_window", "mask", "bias", "key_bias", "t5", "t5_causal", "alibi"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_backward_match_the_cpu_kernel(kind, dtype):
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 45, 70, 64
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype, seed=11)
    opts = options_for(kind, B, H, Nq, Nk)
    for key in ("bias", "t5_table"):
        if key in opts:
            opts[key] = opts[key].to(dtype).requires_grad_()
    for t in (q, k, v):
        t.requires_grad_()
    grads_of = [q, k, v] + [opts[key] for key in ("bias", "t5_table") if key in opts]
    out, lse = ops.attention(q, k, v, return_lse=True, **opts)
    gout, glse = fresh(*out.shape, dtype=dtype), fresh(*lse.shape, dtype=lse.dtype)
    want = torch.autograd.grad((out * gout).sum() + (lse.nan_to_num(0, 0, 0) * glse).sum(), grads_of)

    dq, dk, dv = (t.detach().to(DEVICE).requires_grad_() for t in (q, k, v))
    copts = on(DEVICE, {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()})
    for key in ("bias", "t5_table"):
        if key in copts:
            copts[key].requires_grad_()
    c_out, c_lse = ops.attention(dq, dk, dv, return_lse=True, **copts)
    assert c_out.device.type == DEVICE and c_out.dtype == dtype and c_lse.dtype == lse.dtype
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_rel(c_out, out, rtol)
    assert torch.equal(torch.isinf(c_lse.cpu()), torch.isinf(lse))
    assert_rel(c_lse.nan_to_num(0, 0, 0), lse.nan_to_num(0, 0, 0), rtol, "lse")
    c_grads_of = [dq, dk, dv] + [copts[key] for key in ("bias", "t5_table") if key in copts]
    got = torch.autograd.grad((c_out * gout.to(DEVICE)).sum() + (c_lse.nan_to_num(0, 0, 0) * glse.to(DEVICE)).sum(),
                              c_grads_of)
    for name, a, b in zip(["q", "k", "v", "option"], got, want):
        assert_rel(a, b, 10 * rtol, f"grad of {name}")


@pytest.mark.parametrize("N", [1, 17, 1000])
@pytest.mark.parametrize("D", [32, 64, 80, 128, 256])
def test_odd_sizes_and_head_dims(N, D):
    q, k, v = qkv(1, 4, 1, N, N, D, seed=N + D)  # GQA 4:1
    for causal in (False, True):
        want = ops.attention(q, k, v, causal=causal)
        assert_rel(ops.attention(*cuda(q, k, v), causal=causal), want)


def test_value_dim_differs_from_key_dim():
    q, k, v = qkv(2, 2, 2, 33, 50, 48, Dv=96, seed=5)
    assert_rel(ops.attention(*cuda(q, k, v), causal=True), ops.attention(q, k, v, causal=True))


def sdpa_ref(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_within_twice_sdpa_error(dtype, causal):
    B, H, N, D = 2, 8, 512, 64
    q, k, v = (t.to(DEVICE) for t in qkv(B, H, H, N, N, D, seed=21))
    gout = fresh(B, H, N, D, seed=22).to(DEVICE)

    def run(fn, cast):
        x = [t.to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*x, causal)
        grads = torch.autograd.grad(out, x, gout.to(cast))
        return [out.double()] + [g.double() for g in grads]

    ref = run(sdpa_ref, torch.float64)
    ours = run(lambda a, b, c, cz: ops.attention(a, b, c, causal=cz), dtype)
    theirs = run(sdpa_ref, dtype)
    for name, o, t, r in zip(["out", "dq", "dk", "dv"], ours, theirs, ref):
        err_ours, err_sdpa = (o - r).abs().max().item(), (t - r).abs().max().item()
        assert err_ours <= 2 * err_sdpa + 1e-6, f"{name}: error {err_ours:.3g} vs SDPA's {err_sdpa:.3g}"


def test_backward_is_bitwise_deterministic():
    """20 backward passes of the same forward (same dropout seed): the same
    bits in every gradient, the bias's and the T5 table's included."""
    B, H, N, D = 2, 4, 300, 64
    q, k, v = cuda(*qkv(B, H, 2, N, N, D, seed=31))
    bias = fresh(B, H, N, N, seed=32).to(DEVICE)
    table = fresh(32, H, seed=33).to(DEVICE)
    gout = fresh(B, H, N, D, seed=34).to(DEVICE)
    results = []
    for _ in range(20):
        torch.manual_seed(1234)  # the forward draws its dropout seed from torch's generator
        x = [t.clone().requires_grad_() for t in (q, k, v, bias, table)]
        out = ops.attention(x[0], x[1], x[2], bias=x[3], t5_table=x[4], causal=True, dropout_p=0.1)
        results.append(torch.autograd.grad(out, x, gout))
    for run in results[1:]:
        for name, a, b in zip(["q", "k", "v", "bias", "t5_table"], results[0], run):
            assert torch.equal(a, b), f"grad of {name} differs between runs"


def test_dropout_drops_the_same_elements_as_the_cpu():
    q, k, v = qkv(1, 2, 2, 40, 40, 32, seed=41)
    seed = torch.tensor([987654321], dtype=torch.long)
    cpu_out, _ = torch.ops.attnzoo._attention_forward(q, k, v, dropout_p=0.3, seed=seed)
    gpu_out, _ = torch.ops.attnzoo._attention_forward(*cuda(q, k, v), dropout_p=0.3, seed=seed)
    assert_rel(gpu_out, cpu_out)
    # The same seed drops the same elements in the backward too.
    gout = fresh(1, 2, 40, 32, seed=42)
    lse = torch.ops.attnzoo._attention_forward(q, k, v, dropout_p=0.3, seed=seed)[1]
    cpu_grads = torch.ops.attnzoo._attention_backward(gout, None, q, k, v, cpu_out, lse, dropout_p=0.3, seed=seed,
                                                      output_mask=[False] * 4)
    gpu_grads = torch.ops.attnzoo._attention_backward(*cuda(gout, None, q, k, v, gpu_out, lse), dropout_p=0.3,
                                                      seed=seed, output_mask=[False] * 4)
    for a, b in zip(gpu_grads[:3], cpu_grads[:3]):
        assert_rel(a, b, 1e-4)


def test_fully_masked_rows_give_zero_output_and_gradient():
    B, H, N, D = 1, 2, 20, 32
    q, k, v = cuda(*qkv(B, H, H, N, N, D, seed=51))
    mask = torch.ones(B, 1, N, N, dtype=torch.bool)
    mask[..., 3, :] = False
    mask[..., 7, :] = False
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ops.attention(*x, mask=mask.to(DEVICE), return_lse=True)
    assert torch.isinf(lse[..., [3, 7]]).all() and (lse[..., [3, 7]] < 0).all()
    assert (out[..., [3, 7], :] == 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert (x[0].grad[..., [3, 7], :] == 0).all() and torch.isfinite(x[1].grad).all()


def test_attention_weights_match_the_cpu():
    q, k, v = qkv(2, 3, 3, 30, 50, 16, seed=61)
    opts = options_for("t5", 2, 3, 30, 50)
    assert_rel(ops.attention_weights(*cuda(q, k, v), **on(DEVICE, opts)), ops.attention_weights(q, k, v, **opts))


def test_gradcheck_float64_on_cuda():
    q, k, v = (t.to(DEVICE).requires_grad_() for t in qkv(1, 2, 1, 6, 9, 8, dtype=torch.float64, seed=71))
    bias = fresh(1, 2, 6, 9, dtype=torch.float64, seed=72).to(DEVICE).requires_grad_()
    table = fresh(8, 2, dtype=torch.float64, seed=73).to(DEVICE).requires_grad_()
    fn = lambda q, k, v, b, t: ops.attention(q, k, v, bias=b, t5_table=t, t5_max_distance=16, causal=True)  # noqa
    assert torch.autograd.gradcheck(fn, (q, k, v, bias, table))


def test_composite_kinds_run_on_cuda():
    q, k, v = qkv(1, 2, 2, 64, 64, 32, seed=81)
    rot = lambda x: ops.rotary(x)  # noqa: E731
    assert_rel(rot(q.to(DEVICE)), rot(q))
    E = fresh(16, 64, seed=82)
    assert_rel(ops.linformer_attention(*cuda(q, k, v), E.to(DEVICE)), ops.linformer_attention(q, k, v, E))
    assert_rel(ops.linear_attention(*cuda(q, k, v), causal=True), ops.linear_attention(q, k, v, causal=True), 1e-4)
    g = torch.tensor([0, 33])
    assert_rel(ops.longformer_attention(*cuda(q, k, v), 4, g.to(DEVICE)), ops.longformer_attention(q, k, v, 4, g))


@only_on_gpu
def test_kinds_not_yet_on_cuda_say_so():
    q, k, v = cuda(*qkv(1, 2, 2, 64, 64, 32, seed=91))
    layout = ops.layout_local(4, 4, 1).to(DEVICE)
    with pytest.raises(NotImplementedError, match="block-sparse layouts .* not yet supported on CUDA"):
        ops.block_sparse_attention(q, k, v, layout, 16)
    rel_k = torch.randn(9, 32).to(DEVICE)
    with pytest.raises(NotImplementedError, match="Shaw relative positions .* not yet supported on CUDA"):
        ops.shaw_attention(q, k, v, rel_k, None, 4)
    rotations = torch.randn(32, 1, 2).to(DEVICE)
    with pytest.raises(NotImplementedError, match="lsh_attention is not yet supported on CUDA"):
        ops.lsh_attention(q, v, rotations, 16)


@only_on_gpu
def test_mixed_devices_are_refused():
    q, k, v = qkv(1, 2, 2, 8, 8, 16, seed=95)
    with pytest.raises(RuntimeError, match="one device"):
        ops.attention(q.to(DEVICE), k, v.to(DEVICE))
    with pytest.raises(RuntimeError, match="mask is on cpu"):
        ops.attention(*cuda(q, k, v), mask=torch.ones(8, 8, dtype=torch.bool))


# The zoo's models on CUDA: the kinds with CUDA kernels (dense family and the
# composites); block-sparse, Shaw and LSH are issue 16's and must say so.
MODEL_SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "dropout": 0.0,
               "attention_dropout": 0.0}
MODEL_KINDS = {"dense": {}, "alibi": {}, "rotary": {"rotary_dim": 4}, "t5": {"num_buckets": 8, "max_distance": 16},
               "local": {"window": 3}, "linformer": {"projected_length": 8, "chunk_size": 8},
               "linear": {"feature_map": "elu+1"}}


def zoo_models(kind):
    """(model, inputs, output of interest) for each model type that takes the kind."""
    from attnzoo.models import GPT, Bert, Speech, ViT
    spec = {"kind": kind, **MODEL_KINDS[kind]}
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    made = [(GPT({**MODEL_SMALL, "vocab_size": 61, "max_position_embeddings": 64, "attention": spec}),
             (torch.randint(0, 61, (2, 24), generator=g),))]
    if kind != "linear":  # causal linear attention only
        made.append((Bert({**MODEL_SMALL, "vocab_size": 61, "max_position_embeddings": 64, "num_labels": 3,
                           "attention": spec}), (torch.randint(0, 61, (2, 24), generator=g),)))
        made.append((ViT({**MODEL_SMALL, "image_size": 8, "patch_size": 2, "num_channels": 1, "num_labels": 10,
                          "attention": spec}), (torch.randn(2, 1, 8, 8, generator=g),)))
        made.append((Speech({**MODEL_SMALL, "vocab_size": 29, "subsampling_channels": 4, "conv_kernel_size": 3,
                             "attention": spec}),
                     (torch.randn(2, 3200, generator=g), torch.tensor([3200, 2500]))))
    return made


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_zoo_models_on_cuda_match_the_cpu(kind):
    """Each model moved with .to(device) gives the CPU model's outputs and
    parameter gradients on the same weights and inputs (float32, 1e-4 of the
    largest entry: the products are summed in other orders)."""
    for model, inputs in zoo_models(kind):
        name = type(model).__name__
        want = first_output(model.train()(*inputs))
        want.float().square().mean().backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        model.to(DEVICE)
        assert all(p.device.type == torch.device(DEVICE).type for p in model.parameters()), name
        got = first_output(model(*cuda(*inputs)))
        assert got.device.type == torch.device(DEVICE).type, name
        assert_rel(got, want, 1e-4, f"{name} {kind} output")
        got.float().square().mean().backward()
        for n, g in want_grads.items():
            assert_rel(dict(model.named_parameters())[n].grad, g, 1e-3, f"{name} {kind} grad of {n}")


def test_gpt_generates_the_same_tokens_on_cuda():
    """Greedy generation with the KV cache on the device gives the CPU's tokens."""
    from attnzoo.models import GPT
    torch.manual_seed(0)
    model = GPT({**MODEL_SMALL, "vocab_size": 61, "max_position_embeddings": 64}).eval()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(9))
    want = model.generate(prompt, 20)
    got = model.to(DEVICE).generate(prompt.to(DEVICE), 20)
    assert torch.equal(got.cpu(), want)


@only_on_gpu
@pytest.mark.parametrize("kind", ["block_sparse", "shaw", "lsh"])
def test_zoo_models_with_kinds_not_yet_on_cuda_say_so(kind):
    from attnzoo.models import GPT
    spec = {"block_sparse": {"kind": "block_sparse", "layout": "local", "block_size": 4, "layout_window": 1},
            "shaw": {"kind": "shaw", "max_distance": 3}, "lsh": {"kind": "lsh", "bucket_size": 4}}[kind]
    model = GPT({**MODEL_SMALL, "vocab_size": 61, "max_position_embeddings": 64, "attention": spec}).to(DEVICE)
    with pytest.raises((NotImplementedError, RuntimeError), match="not yet supported on CUDA"):
        model(torch.randint(0, 61, (1, 16), device=DEVICE))


def test_pretrain_on_cuda_in_bfloat16(tmp_path):
    """pretrain --device cuda --dtype bfloat16 on a tiny GPT: it trains,
    writes float32 checkpoints that load on the CPU, and resumes."""
    from attnzoo.train import TrainOptions, pretrain
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    options = TrainOptions(steps=20, batch_size=8, eval_every=10, eval_batches=2, seq_len=32, data_fraction=0.02,
                           log_every=5, warmup_steps=2, dtype="bfloat16")
    model_dir = os.path.join(root, "models", "gpt-kjv")
    small = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64}
    final = pretrain(model_dir, str(tmp_path / "run"), options, model_overrides=small, quiet=True, device=DEVICE)
    assert final["loss"] < 5.0  # uniform over 256 bytes: 5.55
    cpu_model = attnzoo.from_pretrained(tmp_path / "run" / "last")
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in cpu_model.parameters())
    import dataclasses
    pretrain(model_dir, str(tmp_path / "run"), dataclasses.replace(options, steps=25), model_overrides=small,
             quiet=True, device=DEVICE)


def test_a_model_trains_a_step_on_cuda():
    """Not the zoo's models yet (part 2): a tiny attention layer trained on
    CUDA through autograd and an optimiser, its loss going down."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 64, 32, device=DEVICE)
    w = torch.nn.Parameter(torch.randn(3, 32, 32, device=DEVICE) * 0.2)
    opt = torch.optim.Adam([w], lr=1e-2)
    losses = []
    for _ in range(30):
        q, k, v = (x @ w[i] for i in range(3))
        loss = (ops.attention(q, k, v, causal=True) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert attnzoo is not None
