"""The CUDA kernels against the CPU kernels (the oracle the rest of the suite
checks against float64), run by tools/device-check on a GPU machine.

Skipped where torch sees no CUDA device, or where attnzoo was built without
its CUDA kernels (no toolkit): each skip says which. float32 must match the
CPU kernel to 1e-5 relative (gradients 1e-4); bfloat16 / float16 must stay
within twice the error of torch's SDPA in the same precision against a
float64 reference (FlashAttention's rule; for block-sparse layouts SDPA gets
the equivalent dense mask, for Shaw the peer is a PyTorch composite). The
dense kernels, block-sparse layouts and FlexAttention block masks, Shaw,
LSH (the same buckets and dropout as the CPU's), longformer, and every zoo
model kind moved with .to(device).

ATTNZOO_TEST_CUDA_DEVICE=cpu runs the same test code on the CPU against the
CPU (a dry run of the tests themselves, which can then catch nothing about
the kernels: it is how the test code was checked before any GPU ran it)."""
import os

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import layouts, ops

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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
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
def test_mixed_devices_are_refused():
    q, k, v = qkv(1, 2, 2, 8, 8, 16, seed=95)
    with pytest.raises(RuntimeError, match="one device"):
        ops.attention(q.to(DEVICE), k, v.to(DEVICE))
    with pytest.raises(RuntimeError, match="mask is on cpu"):
        ops.attention(*cuda(q, k, v), mask=torch.ones(8, 8, dtype=torch.bool))


# ---------------------------------------------------------------------------
# Block-sparse attention (layouts, FlexAttention block masks, longformer).

def token_mask(layout, block_size, Nq, Nk):
    """(Hl, Nq, Nk) bool: a block layout expanded to tokens."""
    return layout.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :Nq, :Nk]


def random_layout(seed, p=0.5):
    def make(nq, nk, H):
        return torch.rand(H, nq, nk, generator=torch.Generator().manual_seed(seed)) < p
    return make


BLOCK_SPARSE_CASES = {
    # name: B, H, Hkv, Nq, Nk, D, block_size, layout builder (nq, nk, H), options
    "local-64": (2, 4, 4, 256, 256, 64, 64, lambda nq, nk, H: layouts.local(nq, nk, 1), {}),
    "local-causal-gqa-16": (1, 4, 2, 200, 200, 64, 16, lambda nq, nk, H: layouts.local(nq, nk, 2, causal=True),
                            {"causal": True}),
    "bigbird-per-head-24": (2, 4, 4, 240, 240, 64, 24,
                            lambda nq, nk, H: layouts.bigbird(nq, nk, 1, 1, 2, num_heads=H, seed=3), {}),
    "fixed-48-causal": (1, 2, 2, 300, 300, 32, 48, lambda nq, nk, H: layouts.fixed(nq, 3), {"causal": True}),
    "strided-128-gqa": (1, 4, 1, 700, 700, 64, 128, lambda nq, nk, H: layouts.strided(nq, 2), {"causal": True}),
    "longformer-32-mask": (2, 2, 2, 190, 190, 64, 32, lambda nq, nk, H: layouts.longformer(nq, 1, [0, 3]),
                           {"mask": True}),
    "random-rect-64-causal": (2, 2, 1, 130, 260, 128, 64, random_layout(4), {"causal": True}),
    "empty-rows-16": (1, 1, 1, 64, 64, 64, 16,
                      lambda nq, nk, H: torch.tensor([[[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]]],
                                                     dtype=torch.bool), {}),
    "bigbird-48-dropout-gqa": (2, 4, 2, 250, 250, 64, 48,
                               lambda nq, nk, H: layouts.bigbird(nq, nk, 1, 1, 1, num_heads=H, seed=8),
                               {"dropout_p": 0.2}),
}


def block_sparse_case(name, seed=0):
    B, H, Hkv, Nq, Nk, D, bs, make_layout, opts = BLOCK_SPARSE_CASES[name]
    layout = make_layout(layouts.num_blocks(Nq, bs), layouts.num_blocks(Nk, bs), H)
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, seed=seed)
    options = {key: val for key, val in opts.items() if key != "mask"}
    if opts.get("mask"):
        options["mask"] = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(seed + 9)) > 0.2
    return q, k, v, layout, bs, options


def compare_with_cpu(fn, inputs, names, rtol=1e-5, grad_rtol=1e-4, seed=1234, what=""):
    """fn on the CPU inputs and on their copies on DEVICE (fresh leaves, the
    same torch.manual_seed before each: the same dropout seed, which is drawn
    on the CPU): the output and every input's gradient within rtol / grad_rtol
    of the largest entry. Returns the device's (output, gradients)."""
    results = []
    for x in (inputs, cuda(*inputs)):
        leaves = [t.detach().clone().requires_grad_() for t in x]
        torch.manual_seed(seed)
        out = fn(*leaves)
        gout = fresh(*out.shape, seed=seed + 1).to(out.device)
        results.append((out, torch.autograd.grad(out, leaves, gout)))
    (want, want_grads), (got, got_grads) = results
    assert got.device.type == torch.device(DEVICE).type and got.dtype == want.dtype, what
    assert_rel(got, want, rtol, f"{what} output")
    for name, a, b in zip(names, got_grads, want_grads):
        assert_rel(a, b, grad_rtol, f"{what} grad of {name}")
    return got, got_grads


@pytest.mark.parametrize("name", list(BLOCK_SPARSE_CASES))
def test_block_sparse_matches_the_cpu_kernel(name):
    """Layouts of every builder, block sizes that are and are not multiples of
    32, causal, GQA, Nq != Nk, masks, rows with no block, dropout (the same
    seed drops the same elements on both devices): output and gradients."""
    q, k, v, layout, bs, options = block_sparse_case(name, seed=len(name))
    mask = options.pop("mask", None)

    def fn(q, k, v):
        m = None if mask is None else mask.to(q.device)
        return ops.block_sparse_attention(q, k, v, layout.to(q.device), bs, mask=m, **options)

    got, grads = compare_with_cpu(fn, [q, k, v], "qkv", what=name)
    if name.startswith("empty-rows"):  # query block 1 has no key block
        assert (got[..., 16:32, :] == 0).all() and (grads[0][..., 16:32, :] == 0).all()


def test_block_sparse_takes_the_layout_from_the_host():
    """The zoo's models build their layouts on the CPU and pass them as they
    are: a host layout with device tensors gives the device layout's result."""
    q, k, v, layout, bs, options = block_sparse_case("bigbird-per-head-24", seed=3)
    on_device = ops.block_sparse_attention(*cuda(q, k, v, layout), bs)
    on_host = ops.block_sparse_attention(*cuda(q, k, v), layout, bs)
    assert torch.equal(on_host, on_device)


def flex_sliding(width):
    def mod(b, h, q, kv):
        return (q >= kv) & (q - kv < width)
    return mod


def flex_prefix_lm(prefix):
    def mod(b, h, q, kv):
        return (kv < prefix) | (q >= kv)
    return mod


def flex_per_head(b, h, q, kv):
    return (q >= kv) & (q - kv < 16 * (h + 1))


def flex_documents(doc_ids):
    def mod(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)
    return mod


def doc_ids_for(B, N, seed):
    lengths = torch.randint(20, 200, (B, N), generator=torch.Generator().manual_seed(seed))
    return torch.stack([torch.repeat_interleave(torch.arange(N), lengths[b])[:N] for b in range(B)])


FLEX_CASES = [
    # name, B, H, Hkv, N, D, mask_mod factory, per-batch / per-head BlockMask, BLOCK_SIZE, device of the BlockMask
    ("sliding-64", 2, 4, 4, 640, 64, lambda B, N: flex_sliding(100), False, False, 64, DEVICE),
    ("prefix-lm-rect-gqa", 1, 4, 2, 384, 64, lambda B, N: flex_prefix_lm(70), False, False, (64, 32), DEVICE),
    ("per-head-32", 1, 3, 3, 300, 32, lambda B, N: flex_per_head, False, True, 32, DEVICE),
    ("documents-128", 2, 2, 2, 700, 64, lambda B, N: flex_documents(doc_ids_for(B, N, 1)), True, False, 128,
     "cpu"),
]


@pytest.mark.parametrize("name,B,H,Hkv,N,D,make_mod,per_batch,per_head,block,mask_device", FLEX_CASES,
                         ids=[c[0] for c in FLEX_CASES])
def test_flex_block_masks_match_the_cpu(name, B, H, Hkv, N, D, make_mod, per_batch, per_head, block,
                                        mask_device):
    """attnzoo.flex_attention with torch's BlockMask (full blocks unmasked,
    partial blocks through their mask_mod) on the device against the CPU, lse
    and gradients included. The BlockMask is made on the device where its
    mask_mod needs no tensor of its own (documents: on the CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask
    mod = make_mod(B, N)
    bm_cpu = create_block_mask(mod, B if per_batch else None, H if per_head else None, N, N, device="cpu",
                               BLOCK_SIZE=block)
    bm = create_block_mask(mod, B if per_batch else None, H if per_head else None, N, N, device=mask_device,
                           BLOCK_SIZE=block)
    q, k, v = qkv(B, H, Hkv, N, N, D, seed=len(name))
    gqa = H != Hkv

    def run(bm, *x):
        leaves = [t.clone().requires_grad_() for t in x]
        out, lse = attnzoo.flex_attention(*leaves, block_mask=bm, enable_gqa=gqa, return_lse=True)
        gout, glse = fresh(*out.shape, seed=1).to(out.device), fresh(*lse.shape, seed=2).to(out.device)
        grads = torch.autograd.grad((out * gout).sum() + (lse.nan_to_num(0, 0, 0) * glse).sum(), leaves)
        return out, lse, grads

    want, want_lse, want_grads = run(bm_cpu, q, k, v)
    got, got_lse, got_grads = run(bm, *cuda(q, k, v))
    assert got.device.type == torch.device(DEVICE).type
    assert_rel(got, want, what=f"{name} output")
    assert torch.equal(torch.isinf(got_lse.cpu()), torch.isinf(want_lse))
    assert_rel(got_lse.nan_to_num(0, 0, 0), want_lse.nan_to_num(0, 0, 0), what=f"{name} lse")
    for n, a, b in zip("qkv", got_grads, want_grads):
        assert_rel(a, b, 1e-4, f"{name} grad of {n}")


@pytest.mark.parametrize("kind", ["t5", "alibi_causal", "bias", "mask_window", "flex_t5", "flex_bias_dropout"])
def test_block_sparse_with_position_biases_matches_the_cpu(kind):
    """torch.ops.attnzoo.attention with layout= / block_size= (and the block
    masks of a FlexAttention plan) combined with T5 tables, ALiBi, additive
    biases, masks and windows: out, lse, and the gradients of the bias and
    the T5 table too."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, H, Hkv, N, D, bs = 2, 4, 2, 200, 64, 32
    q, k, v = qkv(B, H, Hkv, N, N, D, seed=101)
    nb = layouts.num_blocks(N, bs)
    g = torch.Generator().manual_seed(102)
    opts = {"layout": layouts.bigbird(nb, nb, 1, 1, 1, num_heads=H, seed=7), "block_size": bs}
    if kind.startswith("flex"):
        bm = create_block_mask(flex_sliding(90), None, None, N, N, device="cpu", BLOCK_SIZE=(64, 32))
        plan = attnzoo.flex.block_mask_plan(bm, B, H, N, N)
        opts = {"layout": plan.layout, "block_size": plan.block_size, "block_mask_index": plan.index,
                "block_masks": plan.masks}
    if kind in ("t5", "flex_t5"):
        opts.update(t5_table=torch.randn(32, H, generator=g), scale=1.0)
    elif kind == "alibi_causal":
        opts.update(alibi_slopes=ops.alibi_slopes(H), causal=True)
    elif kind in ("bias", "flex_bias_dropout"):
        opts.update(bias=torch.randn(B, H, N, N, generator=g))
    elif kind == "mask_window":
        opts.update(mask=torch.rand(B, 1, N, N, generator=g) > 0.3, window=[40, 10])
    if kind.endswith("dropout"):
        opts["dropout_p"] = 0.15
    grad_keys = [key for key in ("bias", "t5_table") if key in opts]

    def run(q, k, v, opts):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [opts[key].clone().requires_grad_()
                                                                     for key in grad_keys]
        call = {**opts, **dict(zip(grad_keys, leaves[3:]))}
        torch.manual_seed(55)
        out, lse = torch.ops.attnzoo.attention(*leaves[:3], **call)
        gout, glse = fresh(*out.shape, seed=1).to(out.device), fresh(*lse.shape, seed=2).to(out.device)
        grads = torch.autograd.grad((out * gout).sum() + (lse.nan_to_num(0, 0, 0) * glse).sum(), leaves)
        return out, lse, grads

    want, want_lse, want_grads = run(q, k, v, opts)
    got, got_lse, got_grads = run(*cuda(q, k, v), on(DEVICE, opts))
    assert_rel(got, want, what=f"{kind} output")
    assert torch.equal(torch.isinf(got_lse.cpu()), torch.isinf(want_lse))
    assert_rel(got_lse.nan_to_num(0, 0, 0), want_lse.nan_to_num(0, 0, 0), what=f"{kind} lse")
    for n, a, b in zip(["q", "k", "v"] + grad_keys, got_grads, want_grads):
        assert_rel(a, b, 1e-4, f"{kind} grad of {n}")


@pytest.mark.parametrize("N,window,global_tokens,key_mask", [
    (600, 64, [0, 5], False), (257, 300, [0], True), (500, 40, [], True), (1000, 128, [0, 1, 999], False)])
def test_longformer_matches_the_cpu(N, window, global_tokens, key_mask):
    """longformer_attention on the device (its block-sparse path plus a dense
    call for the global rows) against the CPU's, gradients included."""
    B, H, D = 2, 4, 64
    q, k, v = qkv(B, H, H, N, N, D, seed=N + window)
    km = (torch.rand(B, N, generator=torch.Generator().manual_seed(N)) > 0.2) if key_mask else None
    if km is not None:
        km[:, global_tokens] = True
    g = torch.tensor(global_tokens, dtype=torch.int64)
    compare_with_cpu(lambda q, k, v: ops.longformer_attention(q, k, v, window, g.to(q.device),
                                                              key_mask=None if km is None else km.to(q.device)),
                     [q, k, v], "qkv", what=f"longformer N={N} window={window}")


# ---------------------------------------------------------------------------
# Shaw relative positions.

SHAW_CASES = {
    # name: B, H, Hkv, Nq, Nk, D, Dv, K, per-head tables, with rel_v, options
    "shared": (2, 4, 4, 100, 100, 64, 64, 8, False, True, {}),
    "per-head-causal-gqa-rect": (1, 4, 2, 70, 150, 64, 64, 16, True, True, {"causal": True}),
    "no-rel-v": (1, 2, 2, 90, 90, 64, 64, 4, True, False, {}),
    "k0-mask": (1, 2, 2, 130, 130, 32, 32, 0, False, True, {"mask": True}),
    "k-beyond-n": (1, 2, 2, 50, 50, 64, 64, 200, True, True, {}),
    "dv-differs": (2, 2, 1, 60, 60, 64, 32, 6, True, True, {"causal": True}),
    "dropout": (2, 2, 2, 120, 120, 64, 64, 10, False, True, {"dropout_p": 0.2}),
}


def shaw_case(name, dtype=torch.float32, seed=0):
    B, H, Hkv, Nq, Nk, D, Dv, K, per_head, with_v, opts = SHAW_CASES[name]
    q, k, v = qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=dtype, seed=seed)
    rel_k = fresh(*((H,) if per_head else ()), 2 * K + 1, D, dtype=dtype, seed=seed + 3)
    rel_v = fresh(*((H,) if per_head else ()), 2 * K + 1, Dv, dtype=dtype, seed=seed + 4) if with_v else None
    options = {key: val for key, val in opts.items() if key != "mask"}
    if opts.get("mask"):
        options["mask"] = torch.rand(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(seed + 5)) > 0.3
    return q, k, v, rel_k, rel_v, K, options


@pytest.mark.parametrize("name", list(SHAW_CASES))
def test_shaw_matches_the_cpu_kernel(name):
    """Output and the gradients of q, k, v, rel_k and rel_v against the CPU
    kernel (the same dropout seed through torch.manual_seed)."""
    q, k, v, rel_k, rel_v, K, options = shaw_case(name, seed=len(name))
    mask = options.pop("mask", None)
    inputs = [q, k, v, rel_k] + ([rel_v] if rel_v is not None else [])

    def fn(q, k, v, rel_k, rel_v=None):
        m = None if mask is None else mask.to(q.device)
        return ops.shaw_attention(q, k, v, rel_k, rel_v, K, mask=m, **options)

    compare_with_cpu(fn, inputs, ["q", "k", "v", "rel_k", "rel_v"], what=f"shaw {name}")


def shaw_composite(q, k, v, rel_k, rel_v, K, causal=False, scale=None):
    """Shaw attention from PyTorch ops in the inputs' own dtype: q @ rel_k^T
    gathered by relative position as a bias, softmax, and the rel_v term by
    summing the probabilities of each relative position."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scale = D ** -0.5 if scale is None else scale
    pos = torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)
    r = ((torch.arange(Nk, device=q.device)[None, :] - pos).clamp(-K, K) + K).expand(B, H, Nq, Nk)

    def per_head(t):
        return t if t.dim() == 3 else t.unsqueeze(0).expand(H, -1, -1)

    rel = q @ per_head(rel_k).transpose(-1, -2).unsqueeze(0)  # (B, H, Nq, 2K+1)
    s = (q @ k.transpose(-1, -2) + torch.gather(rel, -1, r)) * scale
    if causal:
        s = s.masked_fill(torch.arange(Nk, device=q.device)[None, :] > pos, float("-inf"))
    p = torch.softmax(s, -1)
    out = p @ v
    if rel_v is not None:
        binned = torch.zeros(B, H, Nq, 2 * K + 1, dtype=p.dtype, device=p.device).scatter_add(-1, r, p)
        out = out + binned @ per_head(rel_v).unsqueeze(0)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_shaw_bfloat16_within_twice_the_composite_error(causal):
    """bfloat16 Shaw within twice the error of the PyTorch composite in
    bfloat16 (against the composite in float64 on the CPU), gradients of the
    tables included."""
    B, H, N, D, K = 2, 4, 256, 64, 16
    q, k, v = qkv(B, H, H, N, N, D, seed=111)
    rel_k, rel_v = fresh(H, 2 * K + 1, D, seed=112), fresh(H, 2 * K + 1, D, seed=113)
    gout = fresh(B, H, N, D, seed=114)

    def run(fn, cast, device):
        x = [t.to(device=device, dtype=cast).requires_grad_() for t in (q, k, v, rel_k, rel_v)]
        out = fn(*x, K, causal=causal)
        grads = torch.autograd.grad(out, x, gout.to(device=device, dtype=cast))
        return [out.double().cpu()] + [g.double().cpu() for g in grads]

    ref = run(shaw_composite, torch.float64, "cpu")
    ours = run(ops.shaw_attention, torch.bfloat16, DEVICE)
    theirs = run(shaw_composite, torch.bfloat16, DEVICE)
    for name, o, t, r in zip(["out", "dq", "dk", "dv", "drel_k", "drel_v"], ours, theirs, ref):
        err_ours, err_theirs = (o - r).abs().max().item(), (t - r).abs().max().item()
        assert err_ours <= 2 * err_theirs + 1e-6, f"{name}: error {err_ours:.3g} vs the composite's {err_theirs:.3g}"


# ---------------------------------------------------------------------------
# Reformer LSH attention.

LSH_CASES = {
    # name: B, H, N, D, bucket_size, n_hashes, n_buckets, per-head rotations, options, seed (one whose
    # hashing has no near-tie: see hash_margin)
    "one-chunk": (2, 2, 50, 64, 64, 2, 2, False, {}, 9),
    "two-chunks-causal": (1, 2, 128, 64, 64, 1, 2, False, {"causal": True}, 17),
    "ragged-key-mask": (2, 2, 250, 32, 32, 2, 8, False, {"key_mask": True}, 15),
    "rounds-per-head-causal": (1, 4, 512, 64, 64, 4, 8, True, {"causal": True}, 1),
    "dropout-ragged": (1, 2, 200, 64, 32, 3, 8, False, {"dropout_p": 0.2, "key_mask": True}, 14),
}


def hash_margin(qk, rotations):
    """The smallest gap, relative to its row's largest score, between the best
    and the second best of [x R, -x R] (float64): where it is tiny, float32
    rounding could let two devices pick different buckets."""
    x, r = qk.double(), rotations.double()
    if r.dim() == 3:
        r = r.unsqueeze(0).expand(x.shape[1], -1, -1, -1)
    rotated = torch.einsum("bhnd,hdrk->bhrnk", x, r)
    scores = torch.cat([rotated, -rotated], -1)
    top = scores.topk(2, -1).values
    return ((top[..., 0] - top[..., 1]) / scores.abs().amax(-1)).min().item()


def lsh_case(name):
    B, H, N, D, bs, R, nb, per_head, opts, seed = LSH_CASES[name]
    qk, v = fresh(B, H, N, D, seed=seed), fresh(B, H, N, D, seed=seed + 1)
    rotations = fresh(*((H,) if per_head else ()), D, R, nb // 2, seed=seed + 2)
    options = {key: val for key, val in opts.items() if key != "key_mask"}
    if opts.get("key_mask"):
        options["key_mask"] = torch.rand(B, N, generator=torch.Generator().manual_seed(seed + 3)) > 0.2
    return qk, v, rotations, bs, options


@pytest.mark.parametrize("name", list(LSH_CASES))
def test_lsh_matches_the_cpu_kernel(name):
    """The same buckets, output and gradients as the CPU kernel for the same
    rotations, and the same dropout for the same torch.manual_seed."""
    qk, v, rotations, bs, options = lsh_case(name)
    assert hash_margin(qk, rotations) > 1e-5, "near-tie in the hashing: pick another seed"

    def run(qk, v, rotations, options):
        leaves = [t.clone().requires_grad_() for t in (qk, v)]
        torch.manual_seed(99)
        out, buckets = ops.lsh_attention(*leaves, rotations, bs, return_buckets=True, **options)
        grads = torch.autograd.grad(out, leaves, fresh(*out.shape, seed=7).to(out.device))
        return out, buckets, grads

    want, want_buckets, want_grads = run(qk, v, rotations, options)
    got, got_buckets, got_grads = run(*cuda(qk, v, rotations), on(DEVICE, options))
    assert got.device.type == torch.device(DEVICE).type and got_buckets.device == got.device
    assert torch.equal(got_buckets.cpu(), want_buckets), f"{name}: buckets differ"
    assert_rel(got, want, what=f"lsh {name} output")
    for n, a, b in zip(["qk", "v"], got_grads, want_grads):
        assert_rel(a, b, 1e-4, f"lsh {name} grad of {n}")


# ---------------------------------------------------------------------------
# All three: bitwise-deterministic backward, low precision, gradcheck.

def deterministic_cases():
    B, H, Hkv, N, D = 2, 4, 2, 300, 64

    def block_sparse():
        q, k, v = qkv(B, H, Hkv, N, N, D, seed=201)
        layout = layouts.bigbird(layouts.num_blocks(N, 48), layouts.num_blocks(N, 48), 1, 1, 2, num_heads=H,
                                 seed=2, causal=True).to(DEVICE)
        return [q, k, v], lambda q, k, v: ops.block_sparse_attention(q, k, v, layout, 48, causal=True,
                                                                    dropout_p=0.1)

    def shaw():
        q, k, v = qkv(B, H, Hkv, N, N, D, seed=202)
        rel_k, rel_v = fresh(H, 33, D, seed=203), fresh(H, 33, D, seed=204)
        return [q, k, v, rel_k, rel_v], lambda q, k, v, rk, rv: ops.shaw_attention(q, k, v, rk, rv, 16, causal=True,
                                                                                    dropout_p=0.1)

    def lsh():
        qk, v = fresh(B, H, 512, D, seed=205), fresh(B, H, 512, D, seed=206)
        rotations = fresh(D, 4, 4, seed=207).to(DEVICE)
        key_mask = (torch.rand(B, 512, generator=torch.Generator().manual_seed(208)) > 0.1).to(DEVICE)
        return [qk, v], lambda qk, v: ops.lsh_attention(qk, v, rotations, 64, key_mask=key_mask, dropout_p=0.1)

    return {"block_sparse": block_sparse, "shaw": shaw, "lsh": lsh}


@pytest.mark.parametrize("kind", ["block_sparse", "shaw", "lsh"])
def test_sparse_kinds_backward_is_bitwise_deterministic(kind):
    """20 backward passes of the same forward (same dropout seed): the same
    bits in every gradient (the relative tables' included)."""
    inputs, fn = deterministic_cases()[kind]()
    inputs = cuda(*inputs)
    results = []
    for _ in range(20):
        torch.manual_seed(1234)
        x = [t.clone().requires_grad_() for t in inputs]
        out = fn(*x)
        if not results:
            gout = fresh(*out.shape, seed=209).to(DEVICE)
        results.append(torch.autograd.grad(out, x, gout))
    for run in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], run)):
            assert torch.equal(a, b), f"{kind}: grad of input {i} differs between runs"


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_bfloat16_within_twice_sdpa_error(causal):
    """bfloat16 block-sparse attention within twice the error of SDPA in
    bfloat16 given the equivalent dense boolean mask (both against SDPA in
    float64 on the CPU)."""
    B, H, N, D, bs = 2, 8, 512, 64, 64
    nb = N // bs
    layout = layouts.bigbird(nb, nb, 1, 1, 2, num_heads=H, seed=5, causal=causal)
    dense_mask = token_mask(layout, bs, N, N).unsqueeze(0)
    if causal:
        dense_mask = dense_mask & torch.ones(N, N, dtype=torch.bool).tril()
    q, k, v = qkv(B, H, H, N, N, D, seed=121)
    gout = fresh(B, H, N, D, seed=122)

    def run(fn, cast, device):
        x = [t.to(device=device, dtype=cast).requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        grads = torch.autograd.grad(out, x, gout.to(device=device, dtype=cast))
        return [out.double().cpu()] + [g.double().cpu() for g in grads]

    def sdpa(device):
        m = dense_mask.to(device)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    ref = run(sdpa("cpu"), torch.float64, "cpu")
    dev_layout = layout.to(DEVICE)
    ours = run(lambda q, k, v: ops.block_sparse_attention(q, k, v, dev_layout, bs, causal=causal), torch.bfloat16,
               DEVICE)
    theirs = run(sdpa(DEVICE), torch.bfloat16, DEVICE)
    for name, o, t, r in zip(["out", "dq", "dk", "dv"], ours, theirs, ref):
        err_ours, err_sdpa = (o - r).abs().max().item(), (t - r).abs().max().item()
        assert err_ours <= 2 * err_sdpa + 1e-6, f"{name}: error {err_ours:.3g} vs SDPA's {err_sdpa:.3g}"


def test_block_sparse_and_shaw_gradcheck_float64_on_cuda():
    q, k, v = (t.to(DEVICE).requires_grad_() for t in qkv(1, 2, 1, 20, 20, 8, dtype=torch.float64, seed=131))
    layout = layouts.bigbird(3, 3, 0, 1, 1, num_heads=2, seed=1).to(DEVICE)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.block_sparse_attention(q, k, v, layout, 8, causal=True),
                                    (q, k, v), eps=1e-6, atol=1e-7)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in qkv(1, 2, 1, 7, 9, 8, dtype=torch.float64, seed=132))
    rel_k = fresh(2, 5, 8, dtype=torch.float64, seed=133).to(DEVICE).requires_grad_()
    rel_v = fresh(2, 5, 8, dtype=torch.float64, seed=134).to(DEVICE).requires_grad_()
    for causal in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, v, rk, rv: ops.shaw_attention(q, k, v, rk, rv, 2, causal=causal),  # noqa: B023
            (q, k, v, rel_k, rel_v), eps=1e-6, atol=1e-7)


# The zoo's models on CUDA: every attention kind in every model that takes it.
MODEL_SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "dropout": 0.0,
               "attention_dropout": 0.0}
MODEL_KINDS = {"dense": {}, "alibi": {}, "rotary": {"rotary_dim": 4}, "t5": {"num_buckets": 8, "max_distance": 16},
               "local": {"window": 3}, "linformer": {"projected_length": 8, "chunk_size": 8},
               "linear": {"feature_map": "elu+1"},
               "block_sparse": {"layout": "bigbird", "block_size": 4, "layout_window": 1, "num_global": 1,
                                "num_random": 1},
               "shaw": {"max_distance": 3},
               # The module draws fresh rotations at every call, with the CPU generator on
               # every device: seeded alike before both forwards (below), the CPU and the
               # CUDA model hash with the same rotations (several chunks per round here).
               "lsh": {"bucket_size": 4, "n_hashes": 2},
               "longformer": {"window": 2, "global_tokens": [0]}}
BIDIRECTIONAL_ONLY = {"longformer"}  # GPT refuses it
CAUSAL_ONLY = {"linear"}  # the zoo's linear attention is causal only


def zoo_models(kind):
    """(model, inputs, output of interest) for each model type that takes the kind."""
    from attnzoo.models import GPT, Bert, Speech, ViT
    spec = {"kind": kind, **MODEL_KINDS[kind]}
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    made = []
    if kind not in BIDIRECTIONAL_ONLY:
        made.append((GPT({**MODEL_SMALL, "vocab_size": 61, "max_position_embeddings": 64, "attention": spec}),
                     (torch.randint(0, 61, (2, 24), generator=g),)))
    if kind not in CAUSAL_ONLY:
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
        torch.manual_seed(1)  # LSH's rotations
        want = first_output(model.train()(*inputs))
        want.float().square().mean().backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        model.to(DEVICE)
        assert all(p.device.type == torch.device(DEVICE).type for p in model.parameters()), name
        torch.manual_seed(1)
        got = first_output(model(*cuda(*inputs)))
        assert got.device.type == torch.device(DEVICE).type, name
        assert_rel(got, want, 1e-4, f"{name} {kind} output")
        got.float().square().mean().backward()
        for n, g in want_grads.items():
            assert_rel(dict(model.named_parameters())[n].grad, g, 1e-3, f"{name} {kind} grad of {n}")


@pytest.mark.parametrize("kind", ["dense", "block_sparse", "shaw"])
def test_gpt_generates_the_same_tokens_on_cuda(kind):
    """Greedy generation with the KV cache on the device gives the CPU's tokens."""
    from attnzoo.models import GPT
    torch.manual_seed(0)
    spec = {"kind": kind, **MODEL_KINDS[kind]}
    model = GPT({**MODEL_SMALL, "vocab_size": 61, "max_position_embeddings": 64, "attention": spec}).eval()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(9))
    want = model.generate(prompt, 20)
    got = model.to(DEVICE).generate(prompt.to(DEVICE), 20)
    assert torch.equal(got.cpu(), want)


def test_speech_seq2seq_transcribes_the_same_on_cuda():
    """The encoder-decoder on the device: teacher-forced logits equal the
    CPU's, and greedy and joint CTC/attention beam search (cache, beam
    reordering, CTC prefix scores on CPU copies) give the CPU's transcripts."""
    from attnzoo.models import SpeechSeq2Seq
    torch.manual_seed(0)
    model = SpeechSeq2Seq({**MODEL_SMALL, "vocab_size": 17, "subsampling_channels": 4, "num_decoder_layers": 2,
                           "decoder_attention": {"kind": "rotary"}}).eval()
    g = torch.Generator().manual_seed(4)
    waves, lengths = torch.randn(2, 6400, generator=g) * 0.3, torch.tensor([6400, 4800])
    ids = torch.randint(1, 17, (2, 6), generator=g)
    ids[:, 0] = 0
    want = model(waves, lengths, ids)[0]
    searches = [dict(max_length=12), dict(max_length=12, beam_size=3, ctc_weight=0.3)]
    want_text = [model.transcribe(waves, lengths, **s) for s in searches]
    model.to(DEVICE)
    got = model(*cuda(waves, lengths, ids))[0]
    assert_rel(got, want, 1e-4, "speech_seq2seq logits")
    for s, text in zip(searches, want_text):
        assert model.transcribe(*cuda(waves, lengths), **s) == text, s


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
