"""attnzoo.integrations.transformers: attn_implementation="attnzoo" in HF
transformers, checked against attn_implementation="eager" on tiny randomly
initialised models built from configs (nothing is downloaded), float32.

For each model: outputs within 1e-5 and every parameter's gradient within
1e-4 of eager's (the same weights: one model, deep-copied, its attention
implementation switched), and for causal LMs left-padded batched greedy
generation identical to eager's. Sanity checks make sure each comparison can
fail: the window, the padding and the kernel call itself matter."""
import copy
import re
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnzoo  # noqa: E402
from attnzoo.integrations import transformers as hf_attnzoo  # noqa: E402

OUT_TOL = 1e-5
GRAD_TOL = 1e-4
VOCAB = 96


@pytest.fixture(autouse=True)
def _setup():
    hf_attnzoo.register()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def randomize(model, seed, std=0.08):
    """Weights larger than HF's default init (std 0.02), so attention is
    peaked rather than nearly uniform and a wrong mask shows clearly; norm
    weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if re.search(r"(norm|ln_)", name, re.I) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(std * noise)
    return model


def pair(cls, config, seed=0):
    """(eager, attnzoo): one randomly initialised model and its deep copy."""
    torch.manual_seed(seed)
    eager = randomize(cls._from_config(config, attn_implementation="eager"), seed)
    zoo = copy.deepcopy(eager)
    zoo.set_attn_implementation("attnzoo")
    assert eager.config._attn_implementation == "eager"
    assert zoo.config._attn_implementation == "attnzoo"
    return eager, zoo


def run(model, inputs, out_of, loss_of):
    """Output (detached) and {name: grad} of one training-mode step (every
    dropout probability is 0 in these configs, so train equals eval)."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = out_of(model(**inputs))
    loss_of(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_same_as_eager(eager, zoo, inputs, out_of, loss_of, rows=None, unused=()):
    """rows: a bool (B, N) selection of the positions compared and trained on
    (e.g. leaving out left-padding positions, whose rows see no key: eager
    averages every value there, attnzoo gives 0; nothing reads them).
    unused: name prefixes of parameters the loss does not reach."""
    out_e, grads_e = run(eager, inputs, out_of, loss_of)
    out_z, grads_z = run(zoo, inputs, out_of, loss_of)
    if rows is not None:
        out_e, out_z = out_e[rows], out_z[rows]
    err = (out_e - out_z).abs().max().item()
    assert err <= OUT_TOL, f"output differs from eager by {err:.3g}"
    assert grads_e.keys() == grads_z.keys()
    assert grads_e.keys() == {n for n, _ in eager.named_parameters() if not n.startswith(tuple(unused))}
    worst = max(grads_e, key=lambda n: (grads_e[n] - grads_z[n]).abs().max().item())
    gerr = (grads_e[worst] - grads_z[worst]).abs().max().item()
    assert gerr <= GRAD_TOL, f"gradient of {worst} differs from eager by {gerr:.3g}"
    assert max(g.abs().max().item() for g in grads_e.values()) > 100 * GRAD_TOL  # the comparison is not vacuous
    return out_e, out_z


def lm_loss(labels, rows=None):
    def loss_of(logits):
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        if rows is None:
            return losses.mean()
        return (losses * rows.flatten()).sum() / rows.sum()
    return loss_of


def left_padded(batch, seq, pad_lengths, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, n in enumerate(pad_lengths):
        ids[b, :n] = 0
        mask[b, :n] = 0
    return ids, mask


def assert_generate_same(eager, zoo, ids, mask, new_tokens=6):
    eager.eval()
    zoo.eval()
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        out_e = eager.generate(ids, **kw)
        out_z = zoo.generate(ids, **kw)
    assert out_e.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    assert torch.equal(out_e, out_z), f"generate differs:\n{out_e[:, ids.shape[1]:]}\n{out_z[:, ids.shape[1]:]}"


class KernelCalls:
    """Records the keyword arguments of every attnzoo.attention call that the
    integration makes."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return attnzoo.attention(*args, **kwargs)

    def __enter__(self):
        self._patch = mock.patch.object(hf_attnzoo, "_attention", self)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        self._patch.__exit__(*exc)


# ---------------------------------------------------------------------------
# Decoders

def llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def test_llama_gqa_forward_backward_generate():
    config = llama_config()
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    eager, zoo = pair(transformers.LlamaForCausalLM, config)
    ids = torch.randint(1, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    with KernelCalls() as calls:
        assert_same_as_eager(eager, zoo, {"input_ids": ids}, lambda o: o.logits, lm_loss(labels))
    # no padding: no N x N mask at all, the kernel's causal flag, K/V heads not repeated
    assert len(calls.calls) == config.num_hidden_layers
    assert all(c["mask"] is None and c["bias"] is None and c["causal"] and c["window"] is None
               for c in calls.calls)

    # left padding: a boolean mask; compared on the real tokens
    ids, mask = left_padded(3, 40, [0, 5, 17], seed=2)
    rows = mask.bool()
    with KernelCalls() as calls:
        assert_same_as_eager(eager, zoo, {"input_ids": ids, "attention_mask": mask}, lambda o: o.logits,
                             lm_loss(torch.roll(ids, -1, 1), rows), rows=rows)
    assert all(c["mask"] is not None and c["mask"].dtype == torch.bool for c in calls.calls)
    assert_generate_same(eager, zoo, ids[:, :24], mask[:, :24])


def test_llama_from_config_and_mask_matters():
    """attn_implementation="attnzoo" at construction; and the sanity check that
    a missing mask would be caught: the same ids without the padding mask give
    other logits on the real tokens."""
    torch.manual_seed(0)
    zoo = randomize(transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="attnzoo"), 0)
    assert zoo.config._attn_implementation == "attnzoo"
    assert type(zoo.model.layers[0].self_attn).__name__ == "LlamaAttention"
    ids, mask = left_padded(2, 32, [0, 9], seed=3)
    zoo.eval()
    with torch.no_grad():
        masked = zoo(ids, attention_mask=mask).logits[mask.bool()]
        unmasked = zoo(ids).logits[mask.bool()]
    assert (masked - unmasked).abs().max() > 100 * OUT_TOL


def test_mistral_sliding_window():
    window = 8
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                        sliding_window=window, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    eager, zoo = pair(transformers.MistralForCausalLM, config)
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    with KernelCalls() as calls:
        out_e, _ = assert_same_as_eager(eager, zoo, {"input_ids": ids}, lambda o: o.logits,
                                        lm_loss(torch.roll(ids, -1, 1)))
    # no padding: the window is the kernel's (sliding_window - 1, 0), no mask
    assert all(c["mask"] is None and c["window"] == (window - 1, 0) for c in calls.calls)

    # the window matters: the same weights without it give other logits
    no_window = copy.deepcopy(eager)
    no_window.config.sliding_window = None
    for layer in no_window.model.layers:
        layer.self_attn.config.sliding_window = None
    with torch.no_grad():
        full = no_window(input_ids=ids).logits
    assert (full[:, window:] - out_e[:, window:]).abs().max() > 100 * OUT_TOL

    # left padding and the window: a boolean mask
    ids, mask = left_padded(2, 40, [0, 13], seed=5)
    rows = mask.bool()
    assert_same_as_eager(eager, zoo, {"input_ids": ids, "attention_mask": mask}, lambda o: o.logits,
                         lm_loss(torch.roll(ids, -1, 1), rows), rows=rows)
    # generation past the window: the sliding KV cache keeps window - 1 keys
    assert_generate_same(eager, zoo, ids[:1, :12], mask[:1, :12], new_tokens=8)  # no padding: mask None
    assert_generate_same(eager, zoo, ids[:, :20], mask[:, :20], new_tokens=8)


def test_qwen2_full_and_sliding_layers():
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      use_sliding_window=True, sliding_window=12, max_window_layers=1,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    eager, zoo = pair(transformers.Qwen2ForCausalLM, config)
    ids = torch.randint(1, VOCAB, (2, 36), generator=torch.Generator().manual_seed(6))
    with KernelCalls() as calls:
        assert_same_as_eager(eager, zoo, {"input_ids": ids}, lambda o: o.logits, lm_loss(torch.roll(ids, -1, 1)))
    assert [c["window"] for c in calls.calls] == [None, (11, 0)]
    ids, mask = left_padded(2, 36, [4, 0], seed=7)
    assert_same_as_eager(eager, zoo, {"input_ids": ids, "attention_mask": mask}, lambda o: o.logits,
                         lm_loss(torch.roll(ids, -1, 1), mask.bool()), rows=mask.bool())


def test_gpt2_forward_backward_generate():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                     eos_token_id=2, pad_token_id=0)
    eager, zoo = pair(transformers.GPT2LMHeadModel, config)
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(8))
    assert_same_as_eager(eager, zoo, {"input_ids": ids}, lambda o: o.logits, lm_loss(torch.roll(ids, -1, 1)))
    ids, mask = left_padded(3, 24, [0, 3, 11], seed=9)
    assert_generate_same(eager, zoo, ids, mask)


# ---------------------------------------------------------------------------
# Encoders

def test_bert_padded_batch():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    eager, zoo = pair(transformers.BertModel, config)
    ids = torch.randint(1, VOCAB, (3, 32), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # right padding
    mask[2, 7:] = 0
    target = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(11))
    with KernelCalls() as calls:
        out_e, _ = assert_same_as_eager(eager, zoo, {"input_ids": ids, "attention_mask": mask},
                                        lambda o: o.last_hidden_state, lambda h: (h * target).sum(-1).mean(),
                                        unused=("pooler.",))
    assert all(c["mask"] is not None and not c["causal"] for c in calls.calls)
    # the padding matters: without the mask the real tokens' states differ
    with torch.no_grad():
        unmasked = eager(input_ids=ids).last_hidden_state
    assert (unmasked[mask.bool()] - out_e[mask.bool()]).abs().max() > 100 * OUT_TOL
    # without padding: no mask, not causal
    with KernelCalls() as calls:
        assert_same_as_eager(eager, zoo, {"input_ids": ids}, lambda o: o.last_hidden_state,
                             lambda h: (h * target).sum(-1).mean(), unused=("pooler.",))
    assert all(c["mask"] is None and not c["causal"] for c in calls.calls)


def test_vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    eager, zoo = pair(transformers.ViTModel, config)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    target = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(13))
    assert_same_as_eager(eager, zoo, {"pixel_values": pixels}, lambda o: o.last_hidden_state,
                         lambda h: (h * target).sum(-1).mean(), unused=("pooler.",))


def test_t5_position_bias_padded_encoder():
    """T5: the relative position bias goes to the kernel as a differentiable
    bias (scale 1.0), beside the padding mask (encoder, cross-attention) or
    the causal flag (decoder)."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    eager, zoo = pair(transformers.T5ForConditionalGeneration, config)
    ids = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(14))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(15))
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": labels.roll(1, 1)}
    with KernelCalls() as calls:
        assert_same_as_eager(eager, zoo, inputs, lambda o: o.logits, lm_loss(labels))
    assert any(c["bias"] is not None and c["bias"].requires_grad for c in calls.calls)
    assert any(c["causal"] and c["mask"] is None for c in calls.calls)  # decoder self-attention

# ---------------------------------------------------------------------------
# The function itself

def qkv(B=2, H=4, Hkv=2, Nq=10, Nk=10, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g),
            torch.randn(B, Hkv, Nk, D, generator=g))


def reference(q, k, v, mask=None, bias=None, scale=None):
    """Plain softmax attention with K/V heads repeated; (B, Nq, H, D)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def test_function_masks_scaling_and_cache_geometry():
    module = torch.nn.Module().eval()
    module.is_causal = True
    q, k, v = qkv(Nq=4, Nk=12)
    # None mask + causal: bottom-right (the last query sees every key), as a KV cache needs
    bottom_right = torch.ones(4, 12, dtype=torch.bool).tril(8)
    out, weights = hf_attnzoo.attention_forward(module, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 4, 4, 16) and out.is_contiguous()
    torch.testing.assert_close(out, reference(q, k, v, bottom_right, scale=0.3), atol=1e-5, rtol=0)
    # bool and float masks, is_causal=False overriding the module
    mask = torch.rand(2, 1, 4, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    want = reference(q, k, v, mask)
    got_bool, _ = hf_attnzoo.attention_forward(module, q, k, v, mask, is_causal=False)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    got_float, _ = hf_attnzoo.attention_forward(module, q, k, v, additive)
    torch.testing.assert_close(got_bool, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_float, want, atol=1e-5, rtol=0)
    # T5-style position bias, differentiable, with a mask
    bias = torch.randn(1, 4, 4, 12, requires_grad=True)
    got, _ = hf_attnzoo.attention_forward(module, q, k, v, mask, position_bias=bias)
    torch.testing.assert_close(got, reference(q, k, v, mask, bias.detach()), atol=1e-5, rtol=0)
    got.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_mask_function_skips_only_exact_patterns():
    from transformers.masking_utils import causal_mask_function, chunked_causal_mask_function, \
        sliding_window_causal_mask_function
    mask_fn = hf_attnzoo.attention_mask
    # plain causal, no padding, positions bottom-right aligned (prefill; decode with a dynamic cache)
    assert mask_fn(2, 8, 8, mask_function=causal_mask_function) is None
    assert mask_fn(2, 1, 9, q_offset=8, mask_function=causal_mask_function) is None
    ones = torch.ones(2, 9, dtype=torch.bool)
    assert mask_fn(2, 1, 9, q_offset=8, mask_function=causal_mask_function, attention_mask=ones) is None
    # a static cache (keys past the queries are empty slots): a real mask
    m = mask_fn(2, 4, 16, q_offset=0, mask_function=causal_mask_function)
    assert m is not None and m.shape == (2, 1, 4, 16) and not m[..., 4:].any()
    # padding: a real mask
    pad = ones.clone()
    pad[1, :3] = False
    m = mask_fn(2, 9, 9, mask_function=causal_mask_function, attention_mask=pad)
    assert m is not None and not m[1, :, :, :3].any()
    # sliding window: skipped when the pattern is HF's window, also with a sliding cache's offset
    assert mask_fn(1, 20, 20, mask_function=sliding_window_causal_mask_function(5), local_size=5) is None
    assert mask_fn(1, 1, 5, q_offset=30, kv_offset=26, mask_function=sliding_window_causal_mask_function(5),
                   local_size=5) is None
    # chunked attention also passes local_size, but its pattern is not a window
    chunked = chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    m = mask_fn(1, 12, 12, mask_function=chunked, local_size=4)
    assert m is not None and not m[0, 0, 5, 3]
    # not allowed to skip (e.g. an overlay on the causal pattern)
    assert mask_fn(1, 8, 8, mask_function=causal_mask_function, allow_is_causal_skip=False) is not None
    # bidirectional: skipped without padding
    assert mask_fn(2, 8, 8, mask_function=lambda b, h, q, kv: q >= 0, allow_is_causal_skip=False,
                   allow_is_bidirectional_skip=True) is None


def test_dropout_only_in_training():
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = qkv()
    plain, _ = hf_attnzoo.attention_forward(module.eval(), q, k, v, None)
    eval_out, _ = hf_attnzoo.attention_forward(module.eval(), q, k, v, None, dropout=0.5)
    assert torch.equal(plain, eval_out)
    torch.manual_seed(0)
    train_out, _ = hf_attnzoo.attention_forward(module.train(), q, k, v, None, dropout=0.5)
    torch.manual_seed(0)
    again, _ = hf_attnzoo.attention_forward(module.train(), q, k, v, None, dropout=0.5)
    assert not torch.allclose(train_out, plain) and torch.equal(train_out, again)


@pytest.mark.parametrize("arg,value", [("softcap", 30.0), ("s_aux", torch.zeros(4)), ("head_mask", torch.ones(4)),
                                       ("output_attentions", True)])
def test_unsupported_arguments_raise(arg, value):
    q, k, v = qkv()
    with pytest.raises(hf_attnzoo.UnsupportedArgument, match=arg):
        hf_attnzoo.attention_forward(torch.nn.Module(), q, k, v, None, **{arg: value})
    assert issubclass(hf_attnzoo.UnsupportedArgument, ValueError)
    assert issubclass(hf_attnzoo.UnsupportedArgument, NotImplementedError)


def test_gemma2_softcap_raises():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=64, sliding_window=8, attn_logit_softcapping=50.0)
    model = transformers.Gemma2ForCausalLM._from_config(config, attn_implementation="attnzoo")
    with pytest.raises(ValueError, match="softcap"):
        model(torch.randint(0, VOCAB, (1, 12)))
