"""The attention ops under torch's transforms: torch.func.grad / vjp /
jacrev (reverse mode, through the C++ autograd node), torch.vmap (the
batching rules of attnzoo._vmap, without torch's per-sample fallback),
forward mode (a clear error), meta tensors (the C++ meta kernels check what
the CPU kernels check) and attention_weights (no gradient claimed)."""
import warnings

import pytest
import torch

from attnzoo import ops


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def qkv(seed, B=2, H=4, Hkv=2, Nq=6, Nk=7, D=5, Dv=3):
    return rand(B, H, Nq, D, seed=seed), rand(B, Hkv, Nk, D, seed=seed + 1), rand(B, Hkv, Nk, Dv, seed=seed + 2)


@pytest.fixture
def no_vmap_fallback():
    """torch's per-sample vmap fallback raises instead of looping."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def test_attention_weights_does_not_claim_a_gradient():
    q, k, v = (t.requires_grad_() for t in qkv(1))
    probs = ops.attention_weights(q, k, v, causal=True)
    assert not probs.requires_grad and probs.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        probs.sum().backward()


def test_func_grad_vjp_and_jacrev_match_autograd():
    q, k, v = qkv(2)
    bias = rand(4, 6, 7, seed=5)
    table = rand(8, 4, seed=6)

    def f(q, k, v, bias, table):
        return ops.attention(q, k, v, bias=bias, causal=True, t5_table=table, t5_max_distance=12)

    inputs = (q, k, v, bias, table)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = f(*leaves)
    cotangent = rand(*out.shape, seed=7)
    want = torch.autograd.grad(out, leaves, cotangent)

    _, vjp_fn = torch.func.vjp(f, *inputs)
    for got, w in zip(vjp_fn(cotangent), want):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-12)
    grads = torch.func.grad(lambda *a: (f(*a) * cotangent).sum(), argnums=(0, 1, 2, 3, 4))(*inputs)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-12)

    # jacrev vmaps the backward over the Jacobian's rows (the batching rule
    # with the bias gradient kept per row), checked against autograd's.
    small = qkv(3, B=1, H=2, Hkv=1, Nq=3, Nk=4, D=2, Dv=2)
    small_bias = rand(2, 3, 4, seed=8)
    jac = torch.func.jacrev(lambda q, b: ops.attention(q, *small[1:], bias=b), argnums=(0, 1))(small[0], small_bias)
    want_jac = torch.autograd.functional.jacobian(lambda q, b: ops.attention(q, *small[1:], bias=b),
                                                  (small[0], small_bias))
    for got, w in zip(jac, want_jac):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-12)


def test_forward_mode_is_a_clear_error():
    q, k, v = qkv(4)
    with pytest.raises(RuntimeError, match="forward-mode AD .* is not implemented; use reverse mode"):
        torch.func.jvp(lambda q: ops.attention(q, k, v), (q,), (torch.ones_like(q),))


@pytest.mark.parametrize("op,fn", [
    ("lsh_attention", lambda q: ops.lsh_attention(q, q, rand(5, 1, 1, seed=20), 4)),
    ("linear_attention", lambda q: ops.linear_attention(q, q, q, causal=True)),
    ("longformer_attention", lambda q: ops.longformer_attention(q, q, q, 2, [0])),
])
def test_forward_mode_is_a_clear_error_for_every_node(op, fn):
    """Each op with its own autograd node refuses a tangent, naming itself."""
    q = rand(1, 2, 8, 5, seed=21)
    with pytest.raises(RuntimeError, match=f"{op}: forward-mode AD .* is not implemented.*; use reverse mode"):
        torch.func.jvp(fn, (q,), (torch.ones_like(q),))


@pytest.mark.parametrize("op,fn", [
    ("attention", lambda q: ops.attention(q, q, q, causal=True)),
    ("lsh_attention", lambda q: ops.lsh_attention(q, q, rand(5, 1, 1, seed=20), 4)),
    ("linear_attention", lambda q: ops.linear_attention(q, q, q, causal=True)),
    ("longformer_attention", lambda q: ops.longformer_attention(q, q, q, 2, [0])),
])
def test_second_derivatives_are_a_clear_error_for_every_node(op, fn):
    """The engine's backward is not differentiable: a gradient made with
    create_graph=True equals the plain one, and a backward through it (or
    torch.func's reverse-over-reverse) stops with an error naming the op,
    where before it silently left out the second-order terms (jacrev of grad
    gave a Hessian of zeros)."""
    q = rand(1, 2, 8, 5, seed=21).requires_grad_()
    plain, = torch.autograd.grad(fn(q).square().sum(), q)
    graph, = torch.autograd.grad(fn(q).square().sum(), q, create_graph=True)
    torch.testing.assert_close(graph, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"{op}: second derivatives .* are not implemented"):
        torch.autograd.grad(graph.sum(), q)
    # Under torch.func the outer transform meets the ops the node runs below
    # autograd, which refuse to be differentiated.
    with pytest.raises(RuntimeError, match=r"derivative for attnzoo::_\w+ is not implemented"):
        torch.func.jacrev(torch.func.grad(lambda q: fn(q).square().sum()))(q.detach())


def loop(fn, *batched):
    return torch.stack([fn(*sample) for sample in zip(*batched)])


def test_vmap_folds_into_the_batch(no_vmap_fallback):
    q, k, v = qkv(10)
    V = 3
    vq, vbias = rand(V, *q.shape, seed=11), rand(V, 4, 1, 7, seed=12)
    vmask = rand(V, 2, 1, 6, 7, seed=13) > -0.5
    slopes = ops.alibi_slopes(4).double()

    def f(q, bias, mask):
        return ops.attention(q, k, v, bias=bias, mask=mask, alibi_slopes=slopes, window=(3, 1))

    got = torch.vmap(f)(vq, vbias, vmask)
    torch.testing.assert_close(got, loop(f, vq, vbias, vmask), rtol=0, atol=1e-12)
    # Other in_dims, and an unbatched (B, ...) bias that must stay per batch entry.
    full_bias = rand(2, 4, 6, 7, seed=14)
    got = torch.vmap(lambda v: ops.attention(q, k, v, bias=full_bias), in_dims=2)(rand(2, 2, V, 7, 3, seed=15))
    want = loop(lambda v: ops.attention(q, k, v, bias=full_bias), rand(2, 2, V, 7, 3, seed=15).movedim(2, 0))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    probs = torch.vmap(lambda q: ops.attention_weights(q, k, v, causal=True))(vq)
    torch.testing.assert_close(probs, loop(lambda q: ops.attention_weights(q, k, v, causal=True), vq),
                               rtol=0, atol=1e-12)


def test_vmap_of_grad_gives_per_sample_gradients(no_vmap_fallback):
    q, k, v = qkv(20)
    vq, vbias = rand(3, *q.shape, seed=21), rand(3, 4, 6, 7, seed=22)

    def loss(q, bias):
        return ops.attention(q, k, v, bias=bias, causal=True).square().sum()

    got = torch.vmap(torch.func.grad(loss, argnums=(0, 1)))(vq, vbias)
    for i in range(3):
        leaves = (vq[i].clone().requires_grad_(), vbias[i].clone().requires_grad_())
        want = torch.autograd.grad(loss(*leaves), leaves)
        for g, w in zip(got, want):
            torch.testing.assert_close(g[i], w, rtol=0, atol=1e-12)


def test_vmap_over_a_shared_table_runs_per_sample_and_says_so():
    q, k, v = qkv(30)
    tables = rand(3, 8, 4, seed=31)

    def f(table):
        return ops.attention(q, k, v, t5_table=table, t5_max_distance=12)

    with pytest.warns(UserWarning, match="vmap over attnzoo::attention with a vmapped t5_table runs once per sample"):
        got = torch.vmap(f)(tables)
    torch.testing.assert_close(got, loop(f, tables), rtol=0, atol=1e-12)


def test_vmap_with_dropout_needs_different_randomness():
    q, k, v = qkv(40)
    vq = rand(2, *q.shape, seed=41)
    with pytest.raises(RuntimeError, match="dropout under vmap needs randomness='different'"):
        torch.vmap(lambda q: ops.attention(q, k, v, dropout_p=0.5))(vq)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.vmap(lambda q: ops.attention(q, k, v, dropout_p=0.5), randomness="different")(vq)
    assert out.shape == (2, *q.shape[:3], 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("mistake,fragment", [
    (lambda q, k, v: (q, k[..., :4], v), "q and k must have the same head dim D"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "k and v must have the same sequence length"),
    (lambda q, k, v: (q, k[:1], v[:1]), "same batch size"),
])
def test_meta_kernels_check_what_the_kernels_check(mistake, fragment):
    q, k, v = qkv(50)
    with pytest.raises(RuntimeError, match=fragment) as on_cpu:
        ops.attention(*mistake(q, k, v))
    with pytest.raises(RuntimeError, match=fragment) as on_meta:
        ops.attention(*mistake(q.to("meta"), k.to("meta"), v.to("meta")))
    assert str(on_meta.value).splitlines()[0] == str(on_cpu.value).splitlines()[0]


def test_meta_and_cpu_inputs_together_are_refused():
    q, k, v = qkv(51)
    with pytest.raises(RuntimeError, match="q, k and v must be on one device, got q on meta, k on cpu"):
        ops.attention(q.to("meta"), k, v)
    with pytest.raises(RuntimeError, match="bias is on meta, q on cpu"):
        ops.attention(q, k, v, bias=rand(4, 6, 7, seed=52).to("meta"))


def test_meta_kernels_give_the_kernels_shapes_and_dtypes():
    q, k, v = qkv(60, Nq=6, Nk=9, Dv=3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        args = [t.to(dtype) for t in (q, k, v)]
        real = torch.ops.attnzoo.attention(*args, causal=True)
        fake = torch.ops.attnzoo.attention(*[t.to("meta") for t in args], causal=True)
        for r, f in zip(real, fake):
            assert (f.shape, f.dtype, f.device.type) == (r.shape, r.dtype, "meta")
    qk = rand(2, 2, 16, 4, seed=61)
    rotations = rand(4, 2, 2, seed=62)
    with pytest.raises(RuntimeError, match="lsh_attention"):
        ops.lsh_attention(qk.to("meta"), qk.to("meta")[..., :10, :], rotations.to("meta"), 4)
