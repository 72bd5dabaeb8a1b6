"""attnzoo.convert: HF GPT-2 / BERT / ViT -> attnzoo models, checked against
transformers on small randomly initialised models (nothing is downloaded)."""
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnzoo  # noqa: E402
from attnzoo import convert, models  # noqa: E402

VOCAB = 100
# float32: relative to the largest expected value. Kernels that sum in another
# order (attnzoo's fused attention against HF's, MKL's AVX2 against its AVX-512
# paths) differ by some hundred ulps of the largest logit, and by how many
# depends on the machine. float64: absolute. A wrong mapping, transpose or
# q/k/v order differs by O(1).
TOL = {torch.float32: 3e-5, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def randomize(model, seed, std=0.3):
    """Every parameter random and far from its default (LayerNorm weights
    around 1, every bias and LayerNorm shift non-zero), so a wrong mapping,
    a missed transpose or a swapped q/k/v cannot match."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm = re.search(r"(LayerNorm|layernorm|ln_)", name) is not None
            p.copy_(1 + 0.3 * noise if is_norm and name.endswith("weight") else std * noise)
    return model.eval()


def max_diff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_matches(got, expected):
    scale = max(1.0, expected.detach().abs().max().item()) if expected.dtype == torch.float32 else 1.0
    diff = max_diff(got, expected)
    assert diff < TOL[expected.dtype] * scale, f"max |got - expected| = {diff:.3g} at value scale {scale:.3g}"


def gpt2(seed=0, **overrides):
    kwargs = dict(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=None,
                  eos_token_id=None)
    kwargs.update(overrides)
    return randomize(transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)), seed)


def bert_config(**overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=56,
                  max_position_embeddings=40, type_vocab_size=3, pad_token_id=1)
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def vit_config(**overrides):
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, image_size=8,
                  patch_size=2, num_channels=3, num_labels=5)
    kwargs.update(overrides)
    return transformers.ViTConfig(**kwargs)


def text_inputs(seed, batch=3, length=13, type_vocab=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    types = torch.randint(0, type_vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return ids, types, mask


# ---------------------------------------------------------------------------
# GPT-2

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_logits(dtype, tie):
    hf = gpt2(seed=1, tie_word_embeddings=tie).to(dtype)
    zoo = convert.from_hf(hf)
    assert isinstance(zoo, models.GPT) and not zoo.training
    assert zoo.config["fused_qkv"] and zoo.config["tie_word_embeddings"] == tie
    assert ("lm_head.weight" in zoo.state_dict()) == (not tie)
    assert zoo.token_embedding.weight.dtype == dtype
    ids, _, _ = text_inputs(2, length=17)
    with torch.no_grad():
        expected = hf(ids).logits
        got = zoo(ids)
    assert got.dtype == dtype and expected.abs().max() > 1.0
    assert_matches(got, expected)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu"])
def test_gpt2_activations(activation):
    hf = gpt2(seed=3, activation_function=activation, n_inner=72).double()
    zoo = convert.from_hf(hf)
    assert zoo.config["intermediate_size"] == 72
    ids, _, _ = text_inputs(4)
    with torch.no_grad():
        assert_matches(zoo(ids), hf(ids).logits)


def test_gpt2_reorder_and_upcast_attn_is_accepted():
    """reorder_and_upcast_attn only changes where the 1/sqrt(d) scaling and
    the float32 upcast happen (eager attention): the same function."""
    hf = gpt2(seed=5, reorder_and_upcast_attn=True)
    hf.config._attn_implementation = "eager"
    zoo = convert.from_hf(hf)
    ids, _, _ = text_inputs(6)
    with torch.no_grad():
        assert_matches(zoo(ids), hf(ids).logits)


def _hf_greedy(hf, ids, **kwargs):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, **kwargs)


def test_gpt2_greedy_generation():
    hf = gpt2(seed=7)
    zoo = convert.from_hf(hf)
    ids, _, _ = text_inputs(8, length=6)
    expected = _hf_greedy(hf, ids, pad_token_id=VOCAB - 1)
    assert expected.shape == (3, 26)
    assert len(set(expected[:, 6:].flatten().tolist())) > 5  # not one repeated token
    assert torch.equal(zoo.generate(ids, 20, temperature=0.0, use_cache=True), expected)
    assert torch.equal(zoo.generate(ids, 20, temperature=0.0, use_cache=False), expected)


def test_gpt2_greedy_generation_stops_at_eos():
    hf = gpt2(seed=7)
    ids, _, _ = text_inputs(8, length=6)
    free = _hf_greedy(hf, ids, pad_token_id=VOCAB - 1)
    eos = int(free[0, 9])  # row 0 ends after 4 new tokens (or earlier), the others when they emit it or never
    hf.config.eos_token_id = eos
    hf.generation_config.eos_token_id = eos
    zoo = convert.from_hf(hf)
    assert zoo.config["eos_token_id"] == eos
    expected = _hf_greedy(hf, ids, pad_token_id=eos)  # finished rows are padded with eos, as attnzoo does
    assert (expected[0, 6:] == eos).any()
    for use_cache in (True, False):
        assert torch.equal(zoo.generate(ids, 20, use_cache=use_cache), expected)


def test_gpt2_split_qkv_layout():
    """The converter also fills an unfused (q_proj/k_proj/v_proj) config."""
    hf = gpt2(seed=9)
    cfg = dict(convert.config_from_hf(hf.config), fused_qkv=False)
    zoo = models.GPT(cfg).eval()
    zoo.load_state_dict(convert.state_dict_from_hf(hf.state_dict(), cfg), strict=True)
    ids, _, _ = text_inputs(10)
    with torch.no_grad():
        assert_matches(zoo(ids), hf(ids).logits)


def test_gpt2_checkpoint_names_without_prefix():
    """Original GPT-2 checkpoints: no 'transformer.' prefix, attn.bias / masked_bias buffers, no lm_head."""
    hf = gpt2(seed=11)
    state = {k[len("transformer."):]: v for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    cfg = convert.config_from_hf(hf.config)
    zoo = models.GPT(cfg).eval()
    zoo.load_state_dict(convert.state_dict_from_hf(state, cfg), strict=True)
    ids, _, _ = text_inputs(12)
    with torch.no_grad():
        assert_matches(zoo(ids), hf(ids).logits)


# ---------------------------------------------------------------------------
# BERT

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tie", [True, False])
def test_bert_masked_lm_logits(dtype, tie):
    hf = randomize(transformers.BertForMaskedLM(bert_config(tie_word_embeddings=tie)), seed=20).to(dtype)
    zoo = convert.from_hf(hf)
    assert isinstance(zoo, models.Bert) and zoo.config["num_labels"] == 0
    assert ("mlm_decoder.weight" in zoo.state_dict()) == (not tie)
    ids, types, mask = text_inputs(21)
    keep = mask.bool()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types).logits
        got = zoo(ids, attention_mask=mask, token_type_ids=types)
        assert expected.abs().max() > 1.0
        assert_matches(got[keep], expected[keep])
        # Defaults: no padding mask, token type 0 everywhere.
        assert_matches(zoo(ids), hf(ids).logits)


def test_bert_activation_and_pretraining_heads():
    """BertForPreTraining: the MLM head is converted, the next-sentence head dropped."""
    hf = randomize(transformers.BertForPreTraining(bert_config(hidden_act="gelu_new")), seed=22)
    zoo = convert.from_hf(hf)
    assert zoo.config["activation"] == "gelu_tanh"
    ids, types, mask = text_inputs(23)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types).prediction_logits
        got = zoo(ids, attention_mask=mask, token_type_ids=types)
    assert_matches(got[mask.bool()], expected[mask.bool()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bert_sequence_classification(dtype):
    hf = randomize(transformers.BertForSequenceClassification(bert_config(num_labels=4)), seed=24).to(dtype)
    with pytest.warns(UserWarning, match="masked-LM head"):
        zoo = convert.from_hf(hf)
    assert zoo.config["num_labels"] == 4
    ids, types, mask = text_inputs(25)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types).logits
        got = zoo.classify(ids, attention_mask=mask, token_type_ids=types)
    assert got.shape == (3, 4) and expected.abs().max() > 0.5
    assert_matches(got, expected)


def test_bert_fused_qkv_layout_and_tf_names():
    """A fused-qkv config is filled too; TensorFlow-style LayerNorm gamma/beta names are read."""
    hf = randomize(transformers.BertForMaskedLM(bert_config()), seed=26)
    state = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
             for k, v in hf.state_dict().items()}
    assert any(k.endswith("gamma") for k in state)
    cfg = dict(convert.config_from_hf(hf.config), fused_qkv=True)
    zoo = models.Bert(cfg).eval()
    zoo.load_state_dict(convert.state_dict_from_hf(state, cfg), strict=True)
    ids, types, mask = text_inputs(27)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types).logits
        got = zoo(ids, attention_mask=mask, token_type_ids=types)
    assert_matches(got[mask.bool()], expected[mask.bool()])


# ---------------------------------------------------------------------------
# ViT

@pytest.mark.parametrize("channels,image,patch,qkv_bias,dtype", [
    (1, 8, 2, True, torch.float32),
    (3, 16, 4, True, torch.float32),
    (3, 8, 4, False, torch.float32),
    (1, 16, 2, True, torch.float64),
    (3, 8, 2, False, torch.float64),
])
def test_vit_logits(channels, image, patch, qkv_bias, dtype):
    config = vit_config(num_channels=channels, image_size=image, patch_size=patch, qkv_bias=qkv_bias)
    hf = randomize(transformers.ViTForImageClassification(config), seed=30 + image + channels).to(dtype)
    zoo = convert.from_hf(hf)
    assert isinstance(zoo, models.ViT) and zoo.config["qkv_bias"] == qkv_bias
    pixels = torch.randn(2, channels, image, image, generator=torch.Generator().manual_seed(31), dtype=dtype)
    with torch.no_grad():
        expected = hf(pixels).logits
        got = zoo(pixels)
    assert got.shape == (2, 5) and expected.abs().max() > 0.5
    assert_matches(got, expected)


def test_vit_checkpoint_names():
    """ViT checkpoints (and transformers < 5) name the blocks encoder.layer.{i}.attention.attention.query etc."""
    hf = randomize(transformers.ViTForImageClassification(vit_config()), seed=32)
    renames = [(r"vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."), (r"attention\.([qkv])_proj", None),
               (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "intermediate.dense"),
               (r"mlp\.fc2", "output.dense")]
    full = {"q": "query", "k": "key", "v": "value"}
    state = {}
    for key, value in hf.state_dict().items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl if repl else (lambda m: f"attention.attention.{full[m.group(1)]}"), key)
        state[key] = value
    assert "vit.encoder.layer.0.attention.attention.query.weight" in state
    state["vit.pooler.dense.weight"] = torch.randn(32, 32)  # a ViTModel pooler is dropped
    state["vit.pooler.dense.bias"] = torch.randn(32)
    cfg = convert.config_from_hf(hf.config)
    zoo = models.ViT(cfg).eval()
    zoo.load_state_dict(convert.state_dict_from_hf(state, cfg), strict=True)
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(33))
    with torch.no_grad():
        assert_matches(zoo(pixels), hf(pixels).logits)


# ---------------------------------------------------------------------------
# Configs, errors, checkpoints

def test_config_from_dict_matches_object():
    for hf_config in (transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2), bert_config(),
                      vit_config()):
        assert convert.config_from_hf(hf_config.to_dict()) == convert.config_from_hf(hf_config)
    cfg = convert.config_from_hf(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert cfg["eos_token_id"] == -1 and cfg["bos_token_id"] == -1  # 50256 lies outside a 100-token vocabulary
    cfg = convert.config_from_hf(bert_config(num_labels=3), architecture="BertForSequenceClassification")
    assert cfg["num_labels"] == 3 and convert.config_from_hf(bert_config(num_labels=3))["num_labels"] == 0


def _dict(hf_config, **changes):
    d = hf_config.to_dict()
    d.update(changes)
    return d


GPT2_BASE = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, bos_token_id=None,
                                    eos_token_id=None)


@pytest.mark.parametrize("config,option", [
    (_dict(GPT2_BASE, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (_dict(GPT2_BASE, scale_attn_weights=False), "scale_attn_weights"),
    (_dict(GPT2_BASE, add_cross_attention=True), "add_cross_attention"),
    (_dict(GPT2_BASE, activation_function="quick_gelu"), "activation_function"),
    (_dict(GPT2_BASE, eos_token_id=[3, 4]), "eos_token_id"),
    (_dict(bert_config(), position_embedding_type="relative_key"), "position_embedding_type"),
    (_dict(bert_config(), is_decoder=True), "is_decoder"),
    (_dict(bert_config(), hidden_act="silu"), "hidden_act"),
    (_dict(vit_config(), image_size=[8, 16]), "image_size"),
    (_dict(vit_config(), patch_size=[2, 4]), "patch_size"),
    (_dict(vit_config(), id2label={}), "num_labels"),
    (_dict(vit_config(), head_dim=4), "head_dim"),
    (_dict(vit_config(), hidden_act="tanh"), "hidden_act"),
    (_dict(bert_config(), model_type="roberta"), "model_type"),
    (_dict(bert_config(), architectures=["BertForTokenClassification"]), "BertForTokenClassification"),
])
def test_unsupported_options_raise(config, option):
    with pytest.raises(ValueError, match=re.escape(option)):
        convert.config_from_hf(config)


def test_state_dict_errors_name_the_keys():
    hf = gpt2(seed=40, n_layer=1)
    cfg = convert.config_from_hf(hf.config)
    state = dict(hf.state_dict())
    del state["transformer.h.0.mlp.c_fc.bias"]
    state["transformer.h.0.crossattention.c_attn.weight"] = torch.zeros(48, 96)
    with pytest.raises(ValueError, match=r"missing keys: h\.0\.mlp\.c_fc\.bias.*unexpected keys.*crossattention"):
        convert.state_dict_from_hf(state, cfg)
    state = dict(hf.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1  # not tied although the config says so
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        convert.state_dict_from_hf(state, cfg)


@pytest.fixture(scope="module")
def converted():
    """(hf model, attnzoo model, inputs, call) for each architecture."""
    ids, types, mask = text_inputs(50)
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(51))
    hf_gpt = gpt2(seed=52)
    hf_bert = randomize(transformers.BertForMaskedLM(bert_config()), seed=53)
    hf_vit = randomize(transformers.ViTForImageClassification(vit_config()), seed=54)
    return {
        "gpt": (hf_gpt, lambda m: m(ids), lambda h: h(ids).logits),
        "bert": (hf_bert, lambda m: m(ids, mask, types)[mask.bool()],
                 lambda h: h(ids, attention_mask=mask, token_type_ids=types).logits[mask.bool()]),
        "vit": (hf_vit, lambda m: m(pixels), lambda h: h(pixels).logits),
    }


@pytest.mark.parametrize("kind", ["gpt", "bert", "vit"])
def test_save_pretrained_round_trip(kind, converted, tmp_path):
    hf, call, _ = converted[kind]
    zoo = convert.from_hf(hf)
    zoo.save_pretrained(tmp_path / "zoo")
    again = attnzoo.from_pretrained(tmp_path / "zoo").eval()
    assert type(again) is type(zoo) and again.config == zoo.config
    with torch.no_grad():
        assert torch.equal(call(again), call(zoo))


@pytest.mark.parametrize("kind", ["gpt", "bert", "vit"])
def test_from_hf_pretrained(kind, converted, tmp_path):
    hf, call, hf_call = converted[kind]
    hf.save_pretrained(tmp_path / "hf")
    zoo = convert.from_hf_pretrained(tmp_path / "hf")
    assert zoo.config["model_type"] == kind and not zoo.training
    with torch.no_grad():
        assert_matches(call(zoo), hf_call(hf))
