"""The zoo's models through the Python facade: every attention kind in every
model it applies to, KV-cache generation, the nn.Module facade (optimizers,
dtype, state_dict, jit.trace, DDP), checkpoints across the two languages, and
clear errors for bad configs and inputs."""
import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import _C
from attnzoo.models import GPT, Bert, Speech, ViT, load_config

SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}
VOCAB = 61

# Parameters for each kind that suit short test sequences.
KINDS = {
    "dense": {},
    "alibi": {},
    "rotary": {"rotary_dim": 4},
    "t5": {"num_buckets": 8, "max_distance": 16},
    "shaw": {"max_distance": 3},
    "local": {"window": 3},
    "block_sparse": {"layout": "bigbird", "block_size": 4, "layout_window": 1, "num_global": 1, "num_random": 1},
    "block_sparse_fixed": {"kind": "block_sparse", "layout": "fixed", "block_size": 4, "stride": 2},
    "block_sparse_strided": {"kind": "block_sparse", "layout": "strided", "block_size": 4, "stride": 2},
    "linformer": {"projected_length": 8, "chunk_size": 8},
    "lsh": {"bucket_size": 4, "n_hashes": 2},
    "linear": {"feature_map": "elu+1"},
    "longformer": {"window": 2, "global_tokens": [0]},
}
BIDIRECTIONAL_ONLY = {"longformer"}
CACHED_KINDS = ["dense", "alibi", "rotary", "t5", "shaw", "local", "block_sparse", "block_sparse_fixed",
                "block_sparse_strided"]


def attention(kind):
    spec = dict(KINDS[kind])
    spec.setdefault("kind", kind)
    return spec


def gpt(kind="dense", **kw):
    torch.manual_seed(0)
    return GPT({**SMALL, "vocab_size": VOCAB, "max_position_embeddings": 64, "attention": attention(kind), **kw})


def ids(b=2, n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, n), generator=g)


def params_changed_by_one_step(model, loss_fn):
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = loss_fn()
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    opt.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert len(changed) == len(before), set(before) - set(changed)
    return loss.item()


# ---------------------------------------------------------------------------
# Every kind trains one step in every model where it applies.

@pytest.mark.parametrize("kind", [k for k in KINDS if k not in BIDIRECTIONAL_ONLY])
def test_gpt_trains_one_step_with_every_causal_kind(kind):
    model = gpt(kind)
    x = ids()
    params_changed_by_one_step(model, lambda: F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()))


@pytest.mark.parametrize("kind", sorted(BIDIRECTIONAL_ONLY))
def test_gpt_refuses_bidirectional_kinds(kind):
    with pytest.raises(ValueError, match=r"attention\.kind.*bidirectional"):
        gpt(kind)


@pytest.mark.parametrize("kind", list(KINDS))
def test_bert_trains_one_step_with_every_kind(kind):
    torch.manual_seed(0)
    model = Bert({**SMALL, "vocab_size": VOCAB, "max_position_embeddings": 64, "num_labels": 3,
                  "attention": attention(kind)})
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 15:] = False
    labels = torch.tensor([0, 2])

    def loss():
        mlm = F.cross_entropy(model(x, mask).flatten(0, 1), x.flatten())
        return mlm + F.cross_entropy(model.classify(x, mask), labels)
    params_changed_by_one_step(model, loss)


@pytest.mark.parametrize("kind", list(KINDS))
def test_vit_trains_one_step_with_every_kind(kind):
    torch.manual_seed(0)
    model = ViT({**SMALL, "image_size": 8, "patch_size": 2, "num_channels": 1, "num_labels": 10,
                 "attention": attention(kind)})
    x = torch.randn(3, 1, 8, 8)
    y = torch.tensor([1, 5, 9])
    params_changed_by_one_step(model, lambda: F.cross_entropy(model(x), y))


# The convolution module does not depend on the attention kind: three kinds cover it.
@pytest.mark.parametrize("kind,conformer", [(k, False) for k in KINDS] +
                         [(k, True) for k in ("dense", "lsh", "block_sparse")])
def test_speech_trains_one_step_with_every_kind(kind, conformer):
    torch.manual_seed(0)
    model = Speech({**SMALL, "vocab_size": 12, "n_mels": 40, "subsampling_channels": 8, "conformer_conv": conformer,
                    "conv_kernel_size": 5, "attention": attention(kind)})
    wave = torch.randn(2, 8000)
    lengths = torch.tensor([8000, 6000])
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    target_lengths = torch.tensor([4, 3])

    def loss():
        log_probs, frames = model(wave, lengths)
        return F.ctc_loss(log_probs.transpose(0, 1), targets, frames, target_lengths, blank=0)
    params_changed_by_one_step(model, loss)


def test_speech_frame_lengths_and_greedy_ctc_decoding():
    model = Speech({**SMALL, "vocab_size": 5, "n_mels": 40, "subsampling_channels": 4}).eval()
    log_probs, frames = model(torch.randn(2, 16000), torch.tensor([16000, 4000]))
    # 16000 samples / hop 160 + 1 = 101 frames; two (3, stride 2) convolutions -> 24.
    assert frames.tolist() == [24, 5] and log_probs.shape == (2, 24, 5)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 24), atol=1e-5)
    fake = torch.full((1, 8, 5), -10.0)
    for t, label in enumerate([0, 3, 3, 0, 3, 1, 1, 2]):
        fake[0, t, label] = 0.0
    assert model.greedy_decode(fake, torch.tensor([8])) == [[3, 3, 1, 2]]
    assert model.greedy_decode(fake, torch.tensor([3])) == [[3]]


def test_speech_padding_does_not_change_the_valid_frames():
    model = Speech({**SMALL, "vocab_size": 7, "n_mels": 40, "subsampling_channels": 4, "conformer_conv": True,
                    "conv_kernel_size": 3}).eval()
    wave = torch.randn(1, 12000)
    alone, n = model(wave)
    padded, m = model(torch.cat([wave, torch.randn(1, 4000)], 1), torch.tensor([12000]))
    assert n.tolist() == m.tolist()
    # The front end's last frames see the padding through the STFT window and
    # the convolutions' receptive field; frames well inside are unaffected.
    k = int(n) - 3
    assert torch.allclose(alone[:, :k], padded[:, :k], atol=1e-4)


def reference_gpt(model, x, attend):
    """The GPT forward pass written out in float64 from the model's tensors,
    with attend(layer_index, q, k, v, layer_params) -> (B, H, N, D)."""
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    cfg = model.config
    H, C = cfg["num_heads"], cfg["hidden_size"]
    B, N = x.shape
    h = p["token_embedding.weight"][x] + p["position_embedding.weight"][:N]
    for i in range(cfg["num_layers"]):
        lp = {k[len(f"layers.{i}."):]: v for k, v in p.items() if k.startswith(f"layers.{i}.")}
        ln = lambda t, n: F.layer_norm(t, (C,), lp[f"{n}.weight"], lp[f"{n}.bias"], cfg["layer_norm_eps"])  # noqa: E731
        a = ln(h, "attn_norm")
        q, k, v = (F.linear(a, lp[f"attn.{n}_proj.weight"], lp[f"attn.{n}_proj.bias"])
                   .view(B, N, H, -1).transpose(1, 2) for n in "qkv")
        o = attend(i, q, k, v, lp).transpose(1, 2).reshape(B, N, C)
        h = h + F.linear(o, lp["attn.out_proj.weight"], lp["attn.out_proj.bias"])
        m = ln(h, "mlp_norm")
        m = F.gelu(F.linear(m, lp["mlp.fc_in.weight"], lp["mlp.fc_in.bias"]), approximate="tanh")
        h = h + F.linear(m, lp["mlp.fc_out.weight"], lp["mlp.fc_out.bias"])
    h = F.layer_norm(h, (C,), p["final_norm.weight"], p["final_norm.bias"], cfg["layer_norm_eps"])
    return h @ p["token_embedding.weight"].T


def test_gpt_dense_matches_a_float64_reference():
    model = gpt().eval().double()
    x = ids(2, 19)

    def attend(i, q, k, v, lp):
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        s = s.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v
    assert (model(x) - reference_gpt(model, x, attend)).abs().max() < 1e-10


def test_attention_maps_are_every_layers_probabilities_from_its_own_input():
    model = gpt().eval().double()
    x = ids(2, 19)
    expected = []

    def attend(i, q, k, v, lp):
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        p = s.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        expected.append(p)
        return p @ v
    reference_gpt(model, x, attend)
    maps = model.attention_maps(x)
    assert len(maps) == len(expected) == 2
    for got, want in zip(maps, expected):
        assert got.shape == (2, 4, 19, 19) and (got - want).abs().max() < 1e-10
    assert model.attention_maps(x[:1, :5])[0].shape == (1, 4, 5, 5)  # nothing left over from the last call
    # Recording is off again afterwards, and never applies to kinds without probabilities.
    assert model._cpp.take_attention_maps() == []
    assert model.attention_maps(x) is not None and model._cpp.take_attention_maps() == []
    # With a KV cache the new queries' rows over every key so far: the last rows of the full maps.
    for kind in ("rotary", "alibi"):
        cached_model = gpt(kind).eval()
        full = cached_model.attention_maps(x)
        cache = attnzoo._C.KVCache()
        cached_model.forward_cached(x[:, :15], cache)
        cached_model._cpp.record_attention(True)
        cached_model.forward_cached(x[:, 15:], cache)
        cached_model._cpp.record_attention(False)
        step = cached_model._cpp.take_attention_maps()
        assert [m.shape for m in step] == [(2, 4, 4, 19)] * 2
        assert all((a - b[:, :, 15:]).abs().max() < 1e-5 for a, b in zip(step, full)), kind
    mixed = gpt(attention=[attention("lsh"), attention("alibi")]).eval()
    maps = mixed.attention_maps(x)
    assert maps[0] is None and maps[1].shape == (2, 4, 19, 19)
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 4, 19, dtype=maps[1].dtype))


@pytest.mark.parametrize("n", [16, 21, 5])
def test_causal_linformer_matches_a_float64_reference(n):
    model = gpt("linformer").eval().double()
    c, kp = KINDS["linformer"]["chunk_size"], KINDS["linformer"]["projected_length"]
    x = ids(2, n)

    def attend(i, q, k, v, lp):
        E = lp["attn.linformer_e"]
        out = torch.empty_like(q)
        for t in range(n):
            start = t - t % c  # this token's chunk starts here
            keys, values = k[:, :, start:t + 1], v[:, :, start:t + 1]
            if start > 0:  # Linformer projection of every earlier chunk
                keys = torch.cat([E[:, :start] @ k[:, :, :start], keys], 2)
                values = torch.cat([E[:, :start] @ v[:, :, :start], values], 2)
            w = (q[:, :, t:t + 1] @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
            out[:, :, t:t + 1] = w @ values
        assert E.shape == (kp, 64)
        return out
    assert (model(x) - reference_gpt(model, x, attend)).abs().max() < 1e-10


# ---------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("kind", CACHED_KINDS)
def test_cached_logits_equal_uncached(kind):
    model = gpt(kind).eval()
    assert model.supports_kv_cache
    x = ids(2, 23)
    full = model(x)
    cache = _C.KVCache()
    steps = [model.forward_cached(x[:, :9], cache)]
    for t in range(9, x.shape[1]):
        steps.append(model.forward_cached(x[:, t:t + 1], cache))
    assert cache.length == x.shape[1]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["dense", "rotary", "t5", "block_sparse", "lsh", "linear"])
def test_generation_with_and_without_cache_agree(kind):
    model = gpt(kind).eval()
    prompt = ids(2, 5)
    if kind == "lsh":
        torch.manual_seed(3)  # fresh rotations each call: only the fallback path is comparable
        a = model.generate(prompt, 12, use_cache=True)
        torch.manual_seed(3)
        b = model.generate(prompt, 12, use_cache=False)
        assert not model.supports_kv_cache
    else:
        a = model.generate(prompt, 12, use_cache=True)
        b = model.generate(prompt, 12, use_cache=False)
    assert a.shape == (2, 17) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["dense", "rotary", "shaw", "block_sparse", "lsh", "linear", "linformer"])
@pytest.mark.parametrize("fused", [False, True])
def test_grouped_query_attention_and_fused_projections(kind, fused):
    kv_heads = 4 if kind == "lsh" else 2  # LSH shares queries and keys: no grouping
    model = gpt(kind, num_kv_heads=kv_heads, fused_qkv=fused)
    attn = dict(model.layers[0].attn.named_children())
    if fused:
        assert set(attn) == {"qkv_proj", "out_proj"}
        assert attn["qkv_proj"].weight.shape[0] == 32 + (0 if kind == "lsh" else 8 * kv_heads) + 8 * kv_heads
    else:
        assert attn["v_proj"].weight.shape == (8 * kv_heads, 32)
    x = ids()
    params_changed_by_one_step(model, lambda: F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()))
    if model.supports_kv_cache:
        model.eval()
        assert torch.equal(model.generate(x[:, :4], 6), model.generate(x[:, :4], 6, use_cache=False))


def test_greedy_generation_follows_the_argmax():
    model = gpt().eval()
    out = model.generate(ids(1, 4), 6)
    for t in range(4, out.shape[1]):
        assert out[0, t] == model(out[:, :t])[0, -1].argmax()


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = gpt().eval()
    prompt = ids(2, 4)
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 10, temperature=0.7, top_k=1, seed=1), model.generate(prompt, 10))
    # A tiny nucleus keeps only the most likely token.
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_p=1e-6, seed=2), model.generate(prompt, 10))


def test_generation_stops_at_eos_and_pads_with_it():
    model = gpt().eval()
    prompt = ids(2, 4)
    greedy = model.generate(prompt, 8)
    eos = int(greedy[0, 6])  # the first row emits it at step 3 or earlier
    out = model.generate(prompt, 8, eos_token_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0, 0].item() + 4
    assert (out[0, first:] == eos).all()
    assert torch.equal(out[:, :first + 1], greedy[:, :first + 1])


def test_generation_rejects_bad_options():
    model = gpt()
    with pytest.raises(RuntimeError, match="top_p"):
        model.generate(ids(1, 3), 2, top_p=0.0)
    with pytest.raises(RuntimeError, match="temperature"):
        model.generate(ids(1, 3), 2, temperature=-1.0)
    with pytest.raises(RuntimeError, match="max_position_embeddings"):
        model.generate(ids(1, 3), 62)


# ---------------------------------------------------------------------------
# The nn.Module facade shares the C++ tensors.

def test_facade_shares_tensors_with_cpp():
    model = gpt()
    py_params = dict(model.named_parameters())
    cpp_params = dict(model._cpp.named_parameters(True).items())
    assert py_params.keys() == cpp_params.keys()
    for k in py_params:
        assert py_params[k].data_ptr() == cpp_params[k].data_ptr()
    x = ids()
    before = model(x)
    with torch.no_grad():
        model.final_norm.bias.add_(1.0)  # through the facade's attribute
    assert not torch.allclose(model(x), before)


def test_to_float64_reaches_cpp_and_matches_float32():
    model = gpt().eval()
    x = ids()
    out32 = model(x)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model._cpp.parameters(True))
    out64 = model(x)
    assert out64.dtype == torch.float64
    assert (out64 - out32.double()).abs().max() < 1e-4


def test_state_dict_round_trip_and_strict_loading():
    a = gpt()
    torch.manual_seed(5)
    b = GPT(a.config)
    x = ids()
    assert not torch.allclose(a.eval()(x), b.eval()(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    state = a.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["final_norm.bias"]
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*final_norm\.bias.*Unexpected key.*extra\.weight"):
        b.load_state_dict(state)


def test_train_and_eval_switch_dropout_in_cpp():
    model = gpt(dropout=0.5)
    x = ids()
    model.train()
    assert model._cpp.training and model.layers[0].training
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))
    model.eval()
    assert not model._cpp.training
    assert torch.equal(model(x), model(x))


def test_loaded_models_come_back_in_eval_mode(tmp_path):
    """As HF's from_pretrained: a loaded model is deterministic (dropout off)
    until the user asks for train(), in both readers and in every submodule."""
    model = gpt(dropout=0.5, attention_dropout=0.5)
    model.save_pretrained(tmp_path)
    assert model.training  # the saved model was in training mode
    x = ids()
    for loaded in (attnzoo.from_pretrained(tmp_path), attnzoo.models.from_pretrained_cpp(tmp_path),
                   GPT.from_pretrained(tmp_path)):
        assert not loaded.training and not loaded._cpp.training
        assert not any(m.training for m in loaded.modules())
        torch.manual_seed(1)
        a = loaded(x)
        torch.manual_seed(2)
        assert torch.equal(a, loaded(x))
        loaded.train()
        assert loaded._cpp.training and loaded.layers[0].training


def test_jit_trace_through_the_facade():
    model = gpt().eval()
    x = ids()
    traced = torch.jit.trace(model, (x,), check_trace=False)
    # Eager, a gelu_tanh MLP runs the engine's rows; the tracer cannot see
    # those, so the model records ATen's gelu there: the two round differently.
    torch.testing.assert_close(traced(x), model(x), rtol=1e-6, atol=1e-6)
    # the blocks are traced as submodule calls (they run through their facades)
    assert "attnzoo::attention" in str(traced.inlined_graph)
    assert model.config["activation"] != "gelu_tanh" or "aten::gelu" in str(traced.inlined_graph)


def test_gelu_tanh_rows_and_atens_gelu_agree_where_each_runs():
    """The fused GELU (tanh) runs in plain eager calls; under a dispatch mode
    (which must see every op: profilers, counters, FakeTensor) and torch.func's
    transforms the model falls back to ATen's gelu; outputs and gradients
    agree."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    model = gpt(activation="gelu_tanh").eval()
    x = ids()
    eager = model(x)
    with Recorder() as recorder:
        seen = model(x)
    assert "aten.gelu.default" in recorder.ops
    torch.testing.assert_close(seen, eager, rtol=1e-6, atol=1e-6)
    params = dict(model.named_parameters())
    loss = lambda p: torch.func.functional_call(model, p, (x,)).square().mean()  # noqa: E731
    grads = torch.func.grad(loss)(params)
    loss(params).backward()
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)


def test_python_forward_matches_the_cpp_checkpoint_reader(tmp_path):
    model = gpt("rotary").eval()
    model.save_pretrained(tmp_path / "py")
    cpp_loaded = attnzoo.models.from_pretrained_cpp(tmp_path / "py").eval()
    x = ids()
    assert (cpp_loaded(x) - model(x)).abs().max() <= 1e-6
    # and the other way: written by C++, read by the Python safetensors package
    model._cpp.save_pretrained(str(tmp_path / "cpp"))
    py_loaded = attnzoo.from_pretrained(tmp_path / "cpp").eval()
    assert (py_loaded(x) - model(x)).abs().max() <= 1e-6
    assert json.loads((tmp_path / "cpp" / "config.json").read_text()) == model.config
    assert not [p for p in os.listdir(tmp_path / "cpp") if ".tmp" in p]


@pytest.mark.parametrize("cls,config,inputs", [
    (Bert, {"vocab_size": VOCAB, "num_labels": 2, "attention": {"kind": "t5"}}, lambda: (ids(),)),
    (ViT, {"image_size": 8, "patch_size": 4, "num_channels": 3}, lambda: (torch.randn(2, 3, 8, 8),)),
    (Speech, {"vocab_size": 9, "n_mels": 40, "subsampling_channels": 4, "conformer_conv": True},
     lambda: (torch.randn(2, 4000),)),
])
def test_every_model_round_trips_through_both_readers(tmp_path, cls, config, inputs):
    torch.manual_seed(0)
    model = cls({**SMALL, **config}).eval()
    model.save_pretrained(tmp_path)
    x = inputs()
    for loaded in (attnzoo.from_pretrained(tmp_path), attnzoo.models.from_pretrained_cpp(tmp_path)):
        assert type(loaded) is cls
        a, b = model(*x), loaded.eval()(*x)
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        assert torch.equal(a, b)


def test_ddp_two_processes_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port), nprocs=2, join=True)


def _ddp_worker(rank, world, port):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = GPT({**SMALL, "vocab_size": VOCAB, "dropout": 0.0, "attention_dropout": 0.0})
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x = ids(2, 12, seed=10 + rank)  # each rank its own data
        loss = F.cross_entropy(ddp(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        flat = torch.cat([p.detach().flatten() for p in model._cpp.parameters(True)])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
        # No rank tears its connections down while the other may still be
        # finishing the all_gather (seen once under load with torch 2.15:
        # a rank aborted with "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Configs and inputs that are wrong give errors naming what is wrong.

@pytest.mark.parametrize("config,match", [
    ({"hidden_sise": 32}, r"'hidden_sise' is not a config key"),
    ({"hidden_size": "32"}, r"'hidden_size' must be an integer"),
    ({"hidden_size": 30, "num_heads": 4}, r"'num_heads' must divide hidden_size"),
    ({"num_kv_heads": 3}, r"'num_kv_heads' must divide num_heads"),
    ({"dropout": 1.5}, r"'dropout' must be in"),
    ({"activation": "swish"}, r"'activation' must be one of"),
    ({"image_size": 8}, r"'image_size' does not apply to model_type \"gpt\""),
    ({"attention": {"kind": "flash"}}, r"'attention.kind' must be one of"),
    ({"attention": {"kind": "dense", "window": 4}}, r"'attention.window' does not apply to attention kind \"dense\""),
    ({"attention": {"kind": "lsh", "bucket_size": 0}}, r"'attention.bucket_size' must be in"),
    ({"attention": [{"kind": "dense"}]}, r"'attention' has 1 entries for 4 layers"),
    ({"attention": [{"kind": "dense"}] * 3 + [{"kind": "rotary", "rotary_dim": 3}]},
     r"'attention\[3\].rotary_dim' must be even"),
    ({"vocab_size": 0}, r"'vocab_size' must be in"),
    ({"eos_token_id": 1000}, r"'eos_token_id' must be in"),
    ({"num_layers": 10 ** 9}, r"'num_layers' must be in"),
    ({"hidden_size": 2 ** 40}, r"'hidden_size' must be in"),
])
def test_bad_configs_name_the_key(config, match):
    with pytest.raises(ValueError, match=match):
        GPT(config)


def test_bad_config_files(tmp_path):
    path = tmp_path / "config.json"
    for text, match in [("{", "malformed JSON"), ("[1, 2]", "must be a dict"), ('{"model_type": "rnn"}', "model_type"),
                        ('{"hidden_size": 32}', "'model_type' is missing"),
                        ('{"model_type": "gpt", "dropout": 2e308}', "malformed JSON")]:  # found by the fuzzer
        path.write_text(text)
        with pytest.raises((ValueError, TypeError), match=match):
            load_config(path)
    with pytest.raises(ValueError, match="'model_type' is 'bert', expected 'gpt'"):
        GPT({"model_type": "bert"})


def test_config_round_trips_and_per_layer_kinds():
    config = load_config({"model_type": "gpt", **SMALL, "attention": [{"kind": "dense"}, {"kind": "lsh"}]})
    assert [a["kind"] for a in config["attention"]] == ["dense", "lsh"]
    assert config["attention"][1] == {"kind": "lsh", "bucket_size": 32, "n_hashes": 2}
    assert load_config(config) == config
    model = GPT(config)
    assert "q_proj" in dict(model.layers[1].attn.named_children()) and "k_proj" not in dict(
        model.layers[1].attn.named_children())  # LSH shares queries and keys


@pytest.mark.parametrize("call,match", [
    (lambda m: m(torch.randint(0, VOCAB, (2,))), r"input_ids must have shape \(batch, length\)"),
    (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), r"input_ids must hold at least one"),
    (lambda m: m(torch.rand(2, 5)), r"input_ids must hold integer ids"),
    (lambda m: m(torch.full((1, 5), VOCAB)), r"input_ids must lie in \[0, 61\)"),
    (lambda m: m(torch.full((1, 5), -1)), r"input_ids must lie in"),
    (lambda m: m(ids(1, 65)), r"max_position_embeddings = 64"),
    (lambda m: m(ids(2, 5), torch.ones(2, 4, dtype=torch.bool)), r"attention_mask must have shape"),
    (lambda m: m(ids(2, 5), torch.ones(2, 5)), r"attention_mask must be bool or integer"),
])
def test_gpt_bad_inputs_name_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(gpt())


def test_bert_predict_mask_gives_the_selected_positions_logits():
    bert = Bert({**SMALL, "vocab_size": VOCAB}).eval()
    x = ids(3, 12)
    keep = torch.rand(3, 12, generator=torch.Generator().manual_seed(2)) < 0.3
    assert torch.allclose(bert(x, predict_mask=keep), bert(x)[keep], atol=1e-6)
    assert bert(x, predict_mask=torch.zeros(3, 12, dtype=torch.bool)).shape == (0, VOCAB)
    with pytest.raises(RuntimeError, match=r"predict_mask must be a bool tensor of the shape of input_ids"):
        bert(x, predict_mask=keep[:, :5])
    with pytest.raises(RuntimeError, match=r"predict_mask must be a bool tensor"):
        bert(x, predict_mask=keep.long())


def test_single_token_sequences_work():
    assert gpt()(ids(1, 1)).shape == (1, 1, VOCAB)
    bert = Bert({**SMALL, "vocab_size": VOCAB})
    assert bert(ids(1, 1)).shape == (1, 1, VOCAB)


def test_other_models_bad_inputs():
    vit = ViT({**SMALL, "image_size": 8, "patch_size": 2})
    with pytest.raises(RuntimeError, match=r"pixel_values must have shape \(batch, 1, 8, 8\)"):
        vit(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="pixel_values must be floating"):
        vit(torch.ones(2, 1, 8, 8, dtype=torch.long))
    bert = Bert({**SMALL, "vocab_size": VOCAB})
    with pytest.raises(RuntimeError, match=r"token_type_ids must lie in \[0, 2\)"):
        bert(ids(1, 5), None, torch.full((1, 5), 2))
    with pytest.raises(RuntimeError, match="classification head"):
        bert.classify(ids(1, 5))
    speech = Speech({**SMALL, "n_mels": 40})
    with pytest.raises(RuntimeError, match="at least n_fft = 400 samples"):
        speech(torch.randn(1, 100))
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, 4000\]"):
        speech(torch.randn(1, 4000), torch.tensor([5000]))


ZOO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")


@pytest.mark.parametrize("name", sorted(os.listdir(ZOO)))
def test_zoo_configs_build_and_run(name):
    config = load_config(os.path.join(ZOO, name))
    model = attnzoo.models.MODEL_CLASSES[config["model_type"]](config).eval()
    assert os.path.exists(os.path.join(ZOO, name, "README.md"))
    with torch.no_grad():
        if config["model_type"] in ("gpt", "bert"):
            out = model(torch.randint(0, config["vocab_size"], (1, 100)))
        elif config["model_type"] == "vit":
            out = model(torch.randn(2, 1, 8, 8))
        elif config["model_type"] == "speech_seq2seq":
            out = model(torch.randn(1, 8000), None, torch.tensor([[config["bos_token_id"], 3, 4]]))[0]
        else:
            out = model(torch.randn(1, 8000))[0]
    assert torch.isfinite(out).all()


def test_hostile_checkpoint_files_give_clear_errors_in_both_languages(tmp_path):
    model = gpt()
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()
    header_len = int.from_bytes(good[:8], "little")
    cases = {
        "truncated": good[: len(good) // 2],
        "huge header length": (2 ** 60).to_bytes(8, "little") + good[8:],
        "header past the end": (len(good)).to_bytes(8, "little") + good[8:],
        "dtype lies": good.replace(b'"F32"', b'"F64"', 1),
        "not JSON": good[:8] + b"x" * header_len + good[8 + header_len:],
    }
    for what, data in cases.items():
        with pytest.raises(ValueError, match="safetensors"):
            _C.parse_safetensors(data)
        path.write_bytes(data)
        with pytest.raises(ValueError, match=str(path)):
            attnzoo.models.from_pretrained_cpp(tmp_path)
        with pytest.raises(ValueError, match=str(path)):  # the Python loader names the file too
            attnzoo.from_pretrained(tmp_path)
    path.write_bytes(good)
    (tmp_path / "config.json").write_text('{"model_type": "gpt", "hidden_size": 33}')
    for load in (attnzoo.from_pretrained, attnzoo.models.from_pretrained_cpp):
        with pytest.raises(ValueError, match="num_heads"):
            load(tmp_path)


def test_default_config_lists_the_parameters_of_the_attention_kind():
    assert attnzoo.models.default_config("gpt")["attention"] == {"kind": "dense"}
    lsh = attnzoo.models.default_config("gpt", "lsh")["attention"]
    assert lsh == {"kind": "lsh", "bucket_size": 32, "n_hashes": 2}
    sparse = attnzoo.models.default_config("bert", attention="block_sparse")
    assert sparse["attention"]["layout"] == "bigbird" and sparse["norm"] == "post"
    # The dict is a valid config as it stands.
    attnzoo.models.Bert(sparse)
    with pytest.raises(ValueError, match="attention.kind.*must be one of"):
        attnzoo.models.default_config("gpt", "flash")
    with pytest.raises(ValueError, match="cannot be used in a causal"):
        attnzoo.models.default_config("gpt", "longformer")


def test_rotary_positions_rotate_every_kind():
    # position_embedding "rotary": each self-attention layer rotates its
    # queries and keys whatever its kind. With dense attention that is
    # exactly the rotary kind (same parameters, same outputs).
    base = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "dropout": 0.0,
            "attention_dropout": 0.0, "max_position_embeddings": 64}
    torch.manual_seed(0)
    rotary_kind = GPT({**base, "position_embedding": "none", "attention": {"kind": "rotary"}}).eval()
    rotary_positions = GPT({**base, "position_embedding": "rotary"}).eval()
    rotary_positions.load_state_dict(rotary_kind.state_dict())
    x = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        assert torch.allclose(rotary_positions(x), rotary_kind(x), atol=1e-6)
    for kind in [{"kind": "local", "window": 8}, {"kind": "block_sparse", "layout": "bigbird", "block_size": 8},
                 {"kind": "linformer", "projected_length": 8, "chunk_size": 8}, {"kind": "linear"},
                 {"kind": "lsh", "bucket_size": 8}]:
        torch.manual_seed(1)
        rotated = GPT({**base, "position_embedding": "rotary", "attention": kind}).eval()
        plain = GPT({**base, "position_embedding": "none", "attention": kind}).eval()
        plain.load_state_dict(rotated.state_dict())
        with torch.no_grad():
            torch.manual_seed(2)
            a = rotated(x)
            torch.manual_seed(2)
            assert not torch.allclose(a, plain(x), atol=1e-3), kind  # the rotation reaches the kind
            if rotated.supports_kv_cache:  # cached decoding rotates by the cache's offset
                cache = attnzoo._C.KVCache()
                steps = [rotated.forward_cached(x[:, :16], cache)]
                steps += [rotated.forward_cached(x[:, t:t + 1], cache) for t in range(16, 40)]
                assert torch.allclose(torch.cat(steps, 1), a, atol=1e-4), kind
    with pytest.raises(ValueError, match="'position_embedding' \"rotary\" needs an even head dimension, got 3"):
        GPT({**base, "num_heads": 8, "hidden_size": 24, "position_embedding": "rotary"})
