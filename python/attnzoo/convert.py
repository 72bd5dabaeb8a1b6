"""Hugging Face ``transformers`` checkpoints -> attnzoo models.

Supported architectures (with their headless base models where the attnzoo
model needs no extra weights):

* GPT-2: ``GPT2LMHeadModel`` (and ``GPT2Model``) -> :class:`attnzoo.models.GPT`
* BERT: ``BertForMaskedLM``, ``BertForPreTraining`` (the next-sentence head is
  dropped) and ``BertForSequenceClassification`` -> :class:`attnzoo.models.Bert`
* ViT: ``ViTForImageClassification`` -> :class:`attnzoo.models.ViT`

    hf = transformers.GPT2LMHeadModel.from_pretrained("ckpt/gpt2")
    gpt = attnzoo.convert.from_hf(hf)            # or convert.from_hf_pretrained("ckpt/gpt2")
    gpt.save_pretrained("ckpt/gpt2-attnzoo")

``transformers`` is only needed by :func:`from_hf_pretrained`; the other
functions take plain configs (an HF config object or its ``to_dict()``) and
state dicts. An HF option that the attnzoo model cannot reproduce raises
``ValueError`` naming the option.

Dropout probabilities matter only in training. attnzoo has one ``dropout``
(embeddings, residual branches, MLP) and one ``attention_dropout``; it takes
GPT-2's ``resid_pdrop`` and BERT/ViT's ``hidden_dropout_prob`` for the first
(GPT-2's ``embd_pdrop`` and BERT's ``classifier_dropout`` are not kept).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch

from . import models

__all__ = ["config_from_hf", "state_dict_from_hf", "from_hf", "from_hf_pretrained", "SUPPORTED_ARCHITECTURES"]

# HF activation names -> attnzoo's. gelu_new / gelu_fast / gelu_accurate are the
# tanh approximation written out in Python (gelu_fast rounds sqrt(2/pi) to ten
# digits, a relative change of 4e-12).
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "relu": "relu",
}

# Architectures (HF class names) per HF model_type; None = unknown (a config
# built by hand), treated as the first entry.
SUPPORTED_ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "bert": ("BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"),
    "vit": ("ViTForImageClassification",),
}
_ZOO_TYPE = {"gpt2": "gpt", "bert": "bert", "vit": "vit"}

_MISSING = object()


# ---------------------------------------------------------------------------
# Configs

class _HFConfig:
    """Uniform read access to an HF config object or its dict."""

    def __init__(self, hf_config: Any):
        if isinstance(hf_config, Mapping):
            self._dict: Optional[Mapping[str, Any]] = hf_config
            self._obj = None
        elif hasattr(hf_config, "model_type"):
            self._dict = None
            self._obj = hf_config
        else:
            raise TypeError("hf_config must be a transformers PretrainedConfig or its dict, "
                            f"got {type(hf_config).__name__}")
        self.model_type = self.get("model_type", None)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if self._dict is not None:
            value = self._dict.get(key, _MISSING)
        else:
            value = getattr(self._obj, key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ValueError(f"HF {self.model_type} config: '{key}' is missing")
            return default
        return value

    def num_labels(self) -> int:
        n = self.get("num_labels", None)
        if n is None:
            id2label = self.get("id2label", None)
            n = len(id2label) if id2label is not None else 2  # PretrainedConfig's default
        return int(n)

    def architecture(self) -> Optional[str]:
        archs = self.get("architectures", None)
        return archs[0] if archs else None


def _unsupported(model_type: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"HF {model_type} config: {key}={value!r} is not supported by attnzoo ({why})")


def _require(c: _HFConfig, key: str, expected: Any, default: Any, why: str) -> None:
    value = c.get(key, default)
    if value != expected:
        raise _unsupported(c.model_type, key, value, why)


def _activation(c: _HFConfig, key: str) -> str:
    value = c.get(key)
    if not isinstance(value, str) or value not in _ACTIVATIONS:
        raise _unsupported(c.model_type, key, value, f"supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[value]


def _token_id(c: _HFConfig, key: str, vocab_size: int, none_value: int) -> int:
    """An HF special-token id as attnzoo's int. None, or an id outside the
    vocabulary (which the model can never emit: HF test configs keep GPT-2's
    50256 with small vocabularies), becomes none_value."""
    value = c.get(key, None)
    if isinstance(value, (list, tuple)):
        inside = sorted({int(v) for v in value if 0 <= int(v) < vocab_size})
        if len(inside) > 1:
            raise _unsupported(c.model_type, key, value, "attnzoo keeps one token id")
        value = inside[0] if inside else None
    if value is None or not 0 <= int(value) < vocab_size:
        return none_value
    return int(value)


def _square(c: _HFConfig, key: str) -> int:
    value = c.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise _unsupported(c.model_type, key, value, "attnzoo's ViT takes square images and patches")
        value = value[0]
    return int(value)


def _architecture(c: _HFConfig, architecture: Optional[str]) -> str:
    supported = SUPPORTED_ARCHITECTURES[c.model_type]
    arch = architecture or c.architecture() or supported[0]
    if arch not in supported:
        raise ValueError(f"HF {c.model_type} architecture {arch!r} is not supported by attnzoo "
                         f"(supported: {', '.join(supported)})")
    return arch


def config_from_hf(hf_config: Any, architecture: Optional[str] = None) -> dict:
    """The attnzoo config dict (complete and validated) of an HF GPT-2, BERT or
    ViT config (a ``PretrainedConfig`` or its dict). ``architecture`` (an HF
    class name such as ``"BertForSequenceClassification"``) picks the heads;
    by default it is ``hf_config.architectures[0]``, else the LM / image
    classification model. Raises ValueError naming any unsupported option."""
    c = _HFConfig(hf_config)
    if c.model_type not in _ZOO_TYPE:
        raise ValueError(f"HF config: model_type={c.model_type!r} is not supported by attnzoo "
                         f"(supported: {', '.join(_ZOO_TYPE)})")
    arch = _architecture(c, architecture)
    build = {"gpt2": _gpt2_config, "bert": _bert_config, "vit": _vit_config}[c.model_type]
    return models.load_config(build(c, arch))


def _gpt2_config(c: _HFConfig, arch: str) -> dict:
    _require(c, "scale_attn_weights", True, True, "attention scores are always scaled by 1/sqrt(head_dim)")
    _require(c, "scale_attn_by_inverse_layer_idx", False, False, "no per-layer 1/(layer+1) score scaling")
    _require(c, "add_cross_attention", False, False, "GPT has no cross-attention")
    # reorder_and_upcast_attn only reorders the 1/sqrt(d) scaling and computes
    # the scores in float32 (eager attention); it changes no weights and, in
    # float32, no result beyond rounding, so it is accepted.
    hidden = int(c.get("n_embd"))
    vocab = int(c.get("vocab_size"))
    inner = c.get("n_inner", None)
    return {
        "model_type": "gpt",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_layers": int(c.get("n_layer")),
        "num_heads": int(c.get("n_head")),
        "num_kv_heads": 0,
        "intermediate_size": int(inner) if inner is not None else 4 * hidden,
        "max_position_embeddings": int(c.get("n_positions")),
        "dropout": float(c.get("resid_pdrop", 0.1)),
        "attention_dropout": float(c.get("attn_pdrop", 0.1)),
        "layer_norm_eps": float(c.get("layer_norm_epsilon", 1e-5)),
        "activation": _activation(c, "activation_function"),
        "norm": "pre",
        "position_embedding": "learned",
        "qkv_bias": True,
        "fused_qkv": True,  # c_attn is one (C, 3C) projection, q|k|v
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", True)),
        "attention": {"kind": "dense"},
        "pad_token_id": _token_id(c, "pad_token_id", vocab, 0),
        "bos_token_id": _token_id(c, "bos_token_id", vocab, -1),
        "eos_token_id": _token_id(c, "eos_token_id", vocab, -1),
    }


def _bert_config(c: _HFConfig, arch: str) -> dict:
    position = c.get("position_embedding_type", None)  # gone from BertConfig in transformers 5; old configs have it
    if position not in (None, "absolute"):
        raise _unsupported("bert", "position_embedding_type", position, "attnzoo's Bert has absolute learned positions")
    _require(c, "is_decoder", False, False, "attnzoo's Bert is a bidirectional encoder")
    _require(c, "add_cross_attention", False, False, "Bert has no cross-attention")
    hidden = int(c.get("hidden_size"))
    vocab = int(c.get("vocab_size"))
    num_labels = c.num_labels() if arch == "BertForSequenceClassification" else 0
    if arch == "BertForSequenceClassification" and num_labels < 1:
        raise _unsupported("bert", "num_labels", num_labels, "a classification head needs at least one label")
    return {
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_layers": int(c.get("num_hidden_layers")),
        "num_heads": int(c.get("num_attention_heads")),
        "num_kv_heads": 0,
        "intermediate_size": int(c.get("intermediate_size")),
        "max_position_embeddings": int(c.get("max_position_embeddings")),
        "dropout": float(c.get("hidden_dropout_prob", 0.1)),
        "attention_dropout": float(c.get("attention_probs_dropout_prob", 0.1)),
        "layer_norm_eps": float(c.get("layer_norm_eps", 1e-12)),
        "activation": _activation(c, "hidden_act"),
        "norm": "post",
        "position_embedding": "learned",
        "qkv_bias": True,
        "fused_qkv": False,
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", True)),
        "attention": {"kind": "dense"},
        "type_vocab_size": int(c.get("type_vocab_size", 2)),
        "pad_token_id": _token_id(c, "pad_token_id", vocab, 0),
        "num_labels": num_labels,
    }


def _vit_config(c: _HFConfig, arch: str) -> dict:
    hidden = int(c.get("hidden_size"))
    heads = int(c.get("num_attention_heads"))
    head_dim = c.get("head_dim", None)
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise _unsupported("vit", "head_dim", head_dim, "attnzoo's head dimension is hidden_size / num_attention_heads")
    num_labels = c.num_labels()
    if num_labels < 1:
        raise _unsupported("vit", "num_labels", num_labels, "attnzoo's ViT always has a classifier")
    return {
        "model_type": "vit",
        "hidden_size": hidden,
        "num_layers": int(c.get("num_hidden_layers")),
        "num_heads": heads,
        "num_kv_heads": 0,
        "intermediate_size": int(c.get("intermediate_size")),
        "dropout": float(c.get("hidden_dropout_prob", 0.0)),
        "attention_dropout": float(c.get("attention_probs_dropout_prob", 0.0)),
        "layer_norm_eps": float(c.get("layer_norm_eps", 1e-12)),
        "activation": _activation(c, "hidden_act"),
        "norm": "pre",
        "qkv_bias": bool(c.get("qkv_bias", True)),
        "fused_qkv": False,
        "attention": {"kind": "dense"},
        "image_size": _square(c, "image_size"),
        "patch_size": _square(c, "patch_size"),
        "num_channels": int(c.get("num_channels", 3)),
        "num_labels": num_labels,
    }


# ---------------------------------------------------------------------------
# State dicts

class _Source:
    """The HF tensors by name (base-model prefix removed), consumed by the
    converter; what is left over or missing is an error."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], model_type: str, base_prefix: str):
        self.model_type = model_type
        self.tensors: Dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            key = name[len(base_prefix):] if name.startswith(base_prefix) else name
            # Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
            key = re.sub(r"(LayerNorm|layernorm\w*|ln_\w+)\.gamma$", r"\1.weight", key)
            key = re.sub(r"(LayerNorm|layernorm\w*|ln_\w+)\.beta$", r"\1.bias", key)
            if key in self.tensors:
                raise ValueError(f"HF {model_type} state dict: {name!r} appears twice "
                                 f"(with and without '{base_prefix}')")
            self.tensors[key] = tensor
        self.missing: List[str] = []

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, required: bool = True) -> Optional[torch.Tensor]:
        tensor = self.tensors.pop(name, None)
        if tensor is None and required:
            self.missing.append(name)
        return None if tensor is None else tensor.detach()

    def first(self, *names: str) -> str:
        """The first of names present (else the first), for layouts that changed names."""
        return next((n for n in names if n in self.tensors), names[0])

    def finish(self, ignore: Iterable[str]) -> None:
        patterns = [re.compile(p) for p in ignore]
        unexpected = sorted(k for k in self.tensors if not any(p.fullmatch(k) for p in patterns))
        problems = []
        if self.missing:
            problems.append("missing keys: " + ", ".join(self.missing))
        if unexpected:
            problems.append("unexpected keys (a feature attnzoo does not have, or a config that does not fit): " +
                            ", ".join(unexpected))
        if problems:
            raise ValueError(f"HF {self.model_type} state dict does not fit the attnzoo model: " + "; ".join(problems))


def _put_linear(out: dict, src: _Source, hf: str, zoo: str, bias: bool = True, conv1d: bool = False) -> None:
    w = src.take(hf + ".weight")
    if w is not None:
        out[zoo + ".weight"] = w.t() if conv1d else w
    if bias:
        b = src.take(hf + ".bias")
        if b is not None:
            out[zoo + ".bias"] = b


def _put_norm(out: dict, src: _Source, hf: str, zoo: str) -> None:
    _put_linear(out, src, hf, zoo)


def _put_qkv(out: dict, cfg: dict, zoo: str, q, k, v, qb, kb, vb) -> None:
    """q/k/v weights (out, in) and biases (or None) into the layout cfg asks for."""
    if any(t is None for t in (q, k, v)):
        return  # recorded as missing
    if cfg["fused_qkv"]:
        out[zoo + ".qkv_proj.weight"] = torch.cat([q, k, v], 0)
        if cfg["qkv_bias"] and not any(t is None for t in (qb, kb, vb)):
            out[zoo + ".qkv_proj.bias"] = torch.cat([qb, kb, vb], 0)
    else:
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[f"{zoo}.{name}.weight"] = w
            if cfg["qkv_bias"] and b is not None:
                out[f"{zoo}.{name}.bias"] = b


def _check_tied(src: _Source, name: str, embedding: Optional[torch.Tensor], model_type: str) -> None:
    """A tied output matrix in the checkpoint must equal the token embedding."""
    tied = src.take(name, required=False)
    if tied is not None and embedding is not None and not torch.equal(tied, embedding):
        raise ValueError(f"HF {model_type} state dict: {name} differs from the token embedding although "
                         "tie_word_embeddings is true")


def state_dict_from_hf(hf_state_dict: Mapping[str, torch.Tensor], config_dict: Any) -> Dict[str, torch.Tensor]:
    """HF GPT-2 / BERT / ViT tensors renamed (and GPT-2's Conv1D weights
    transposed) to the attnzoo names of ``config_dict`` (an attnzoo config,
    e.g. from :func:`config_from_hf`). Missing or unexpected tensors raise
    ValueError naming them; HF buffers (GPT-2's ``attn.bias``) and heads that
    the attnzoo model lacks (BERT's next-sentence head, pooler without a
    classifier, ViT's pooler) are dropped.

    A BERT sequence-classification checkpoint has no masked-LM head: when
    ``num_labels > 0`` and the whole head is absent, the result has no
    ``mlm_*`` tensors (:func:`from_hf` keeps the model's fresh ones)."""
    cfg = models.load_config(config_dict)
    convert = {"gpt": _gpt2_state, "bert": _bert_state, "vit": _vit_state}.get(cfg["model_type"])
    if convert is None:
        raise ValueError(f"state_dict_from_hf: attnzoo model_type {cfg['model_type']!r} has no HF counterpart")
    return convert(hf_state_dict, cfg)


def _gpt2_state(sd: Mapping[str, torch.Tensor], cfg: dict) -> dict:
    src = _Source(sd, "gpt2", "transformer.")
    out: Dict[str, torch.Tensor] = {}
    wte = src.take("wte.weight")
    if wte is not None:
        out["token_embedding.weight"] = wte
    out_pos = src.take("wpe.weight")
    if out_pos is not None:
        out["position_embedding.weight"] = out_pos
    for i in range(cfg["num_layers"]):
        h, z = f"h.{i}", f"layers.{i}"
        _put_norm(out, src, f"{h}.ln_1", f"{z}.attn_norm")
        w = src.take(f"{h}.attn.c_attn.weight")  # (C, 3C)
        b = src.take(f"{h}.attn.c_attn.bias")
        if w is not None and b is not None:
            q, k, v = w.t().chunk(3, 0)
            qb, kb, vb = b.chunk(3, 0)
            _put_qkv(out, cfg, f"{z}.attn", q, k, v, qb, kb, vb)
        _put_linear(out, src, f"{h}.attn.c_proj", f"{z}.attn.out_proj", conv1d=True)
        _put_norm(out, src, f"{h}.ln_2", f"{z}.mlp_norm")
        _put_linear(out, src, f"{h}.mlp.c_fc", f"{z}.mlp.fc_in", conv1d=True)
        _put_linear(out, src, f"{h}.mlp.c_proj", f"{z}.mlp.fc_out", conv1d=True)
    _put_norm(out, src, "ln_f", "final_norm")
    if cfg["tie_word_embeddings"]:
        _check_tied(src, "lm_head.weight", wte, "gpt2")
    else:
        _put_linear(out, src, "lm_head", "lm_head", bias=False)
    src.finish([r"h\.\d+\.attn\.(bias|masked_bias)"])
    return out


def _bert_state(sd: Mapping[str, torch.Tensor], cfg: dict) -> dict:
    src = _Source(sd, "bert", "bert.")
    out: Dict[str, torch.Tensor] = {}
    emb = src.take("embeddings.word_embeddings.weight")
    if emb is not None:
        out["token_embedding.weight"] = emb
    _put_linear(out, src, "embeddings.position_embeddings", "position_embedding", bias=False)
    _put_linear(out, src, "embeddings.token_type_embeddings", "token_type_embedding", bias=False)
    _put_norm(out, src, "embeddings.LayerNorm", "embedding_norm")
    for i in range(cfg["num_layers"]):
        h, z = f"encoder.layer.{i}", f"layers.{i}"
        a = f"{h}.attention.self"
        q, k, v = (src.take(f"{a}.{n}.weight") for n in ("query", "key", "value"))
        qb, kb, vb = (src.take(f"{a}.{n}.bias") for n in ("query", "key", "value"))
        _put_qkv(out, cfg, f"{z}.attn", q, k, v, qb, kb, vb)
        _put_linear(out, src, f"{h}.attention.output.dense", f"{z}.attn.out_proj")
        _put_norm(out, src, f"{h}.attention.output.LayerNorm", f"{z}.attn_norm")
        _put_linear(out, src, f"{h}.intermediate.dense", f"{z}.mlp.fc_in")
        _put_linear(out, src, f"{h}.output.dense", f"{z}.mlp.fc_out")
        _put_norm(out, src, f"{h}.output.LayerNorm", f"{z}.mlp_norm")

    p = "cls.predictions"
    has_mlm = any(k.startswith(p + ".") for k in src.tensors)
    if has_mlm or cfg["num_labels"] == 0:
        _put_linear(out, src, f"{p}.transform.dense", "mlm_transform")
        _put_norm(out, src, f"{p}.transform.LayerNorm", "mlm_norm")
        # The logits add decoder.bias (HF ties cls.predictions.bias to it; an
        # untied model only uses decoder.bias).
        bias = src.take(src.first(f"{p}.decoder.bias", f"{p}.bias"))
        src.take(f"{p}.bias", required=False)
        if bias is not None:
            out["mlm_bias"] = bias
        if cfg["tie_word_embeddings"]:
            _check_tied(src, f"{p}.decoder.weight", emb, "bert")
        else:
            _put_linear(out, src, f"{p}.decoder", "mlm_decoder", bias=False)
    ignore = [r"embeddings\.(position_ids|token_type_ids)", r"cls\.seq_relationship\.(weight|bias)"]
    if cfg["num_labels"] > 0:
        _put_linear(out, src, "pooler.dense", "pooler")
        _put_linear(out, src, "classifier", "classifier")
    else:
        ignore.append(r"pooler\.dense\.(weight|bias)")
    src.finish(ignore)
    return out


def _vit_state(sd: Mapping[str, torch.Tensor], cfg: dict) -> dict:
    src = _Source(sd, "vit", "vit.")
    out: Dict[str, torch.Tensor] = {}
    for hf, zoo in (("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "position_embedding")):
        t = src.take(hf)
        if t is not None:
            out[zoo] = t
    _put_linear(out, src, "embeddings.patch_embeddings.projection", "patch_embedding")
    bias = cfg["qkv_bias"]
    for i in range(cfg["num_layers"]):
        z = f"layers.{i}"
        if src.has(f"layers.{i}.attention.q_proj.weight"):  # transformers >= 5 module names
            h = f"layers.{i}"
            qkv = [f"{h}.attention.{n}_proj" for n in "qkv"]
            names = {"o": f"{h}.attention.o_proj", "fc1": f"{h}.mlp.fc1", "fc2": f"{h}.mlp.fc2"}
        else:  # checkpoint names (and transformers < 5)
            h = f"encoder.layer.{i}"
            qkv = [f"{h}.attention.attention.{n}" for n in ("query", "key", "value")]
            names = {"o": f"{h}.attention.output.dense", "fc1": f"{h}.intermediate.dense", "fc2": f"{h}.output.dense"}
        q, k, v = (src.take(n + ".weight") for n in qkv)
        qb, kb, vb = (src.take(n + ".bias") if bias else None for n in qkv)
        _put_qkv(out, cfg, f"{z}.attn", q, k, v, qb, kb, vb)
        _put_linear(out, src, names["o"], f"{z}.attn.out_proj")
        _put_norm(out, src, f"{h}.layernorm_before", f"{z}.attn_norm")
        _put_linear(out, src, names["fc1"], f"{z}.mlp.fc_in")
        _put_linear(out, src, names["fc2"], f"{z}.mlp.fc_out")
        _put_norm(out, src, f"{h}.layernorm_after", f"{z}.mlp_norm")
    _put_norm(out, src, "layernorm", "final_norm")
    _put_linear(out, src, "classifier", "classifier")
    src.finish([r"pooler\.dense\.(weight|bias)"])
    return out


# ---------------------------------------------------------------------------
# Models

def _floating_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def from_hf(hf_model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> models.ZooModel:
    """The attnzoo model (GPT, Bert or ViT) holding an HF model's weights,
    loaded strictly, on the CPU, in ``dtype`` (default: the HF model's), in
    the HF model's train/eval mode."""
    arch = type(hf_model).__name__
    cfg = config_from_hf(hf_model.config, architecture=arch)
    state = state_dict_from_hf(hf_model.state_dict(), cfg)
    model = models.MODEL_CLASSES[cfg["model_type"]](cfg)
    model.to(dtype or _floating_dtype(hf_model))
    own = model.state_dict()
    absent = sorted(set(own) - set(state))
    if absent and cfg["model_type"] == "bert" and cfg["num_labels"] > 0 and all(k.startswith("mlm_") for k in absent):
        warnings.warn(f"{arch} has no masked-LM head: the attnzoo Bert's {', '.join(absent)} keep their fresh "
                      "initialisation (classify() is converted; forward()'s MLM logits are untrained)", stacklevel=2)
        state.update({k: own[k] for k in absent})
    model.load_state_dict(state, strict=True)
    model.train(hf_model.training)
    return model


def from_hf_pretrained(path_or_dir: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                       **from_pretrained_kwargs) -> models.ZooModel:
    """Loads a local HF checkpoint (a directory, or a model id already in the
    HF cache; nothing is downloaded) with ``transformers`` and converts it
    with :func:`from_hf`. The HF class is the checkpoint's
    ``architectures[0]`` (else GPT2LMHeadModel / BertForMaskedLM /
    ViTForImageClassification)."""
    import transformers  # only needed here

    path = os.fspath(path_or_dir)
    kwargs = {"local_files_only": True, **from_pretrained_kwargs}
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=kwargs["local_files_only"])
    c = _HFConfig(hf_config)
    if c.model_type not in _ZOO_TYPE:
        raise ValueError(f"{path}: HF model_type={c.model_type!r} is not supported by attnzoo "
                         f"(supported: {', '.join(_ZOO_TYPE)})")
    arch = _architecture(c, None)
    hf_class = getattr(transformers, arch)
    hf_model = hf_class.from_pretrained(path, config=hf_config, **kwargs)
    hf_model.eval()
    return from_hf(hf_model, dtype=dtype)
