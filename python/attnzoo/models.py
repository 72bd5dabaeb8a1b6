"""The zoo's models: C++ modules (``attnzoo::models``) behind ``nn.Module`` facades.

The facade's ``_parameters``, ``_buffers`` and ``_modules`` are the C++
module's own tensors and children, so optimizers, ``.to(dtype)``,
``state_dict``/``load_state_dict``, DistributedDataParallel and FSDP2 act on
the tensors the C++ forward pass uses; nothing is copied. Assigning a
parameter slot writes through to the C++ module, and the C++ model runs each
transformer block through its facade, so hooks on blocks run.

    gpt = attnzoo.models.GPT({"vocab_size": 256, "hidden_size": 128, "num_layers": 2, "num_heads": 4})
    logits = gpt(input_ids)
    gpt.save_pretrained("run/ckpt")
    again = attnzoo.from_pretrained("run/ckpt")
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping, Optional, Union

import torch
import torch.utils.checkpoint
from torch import nn

from . import _C
from ._files import atomic_write, write_text_atomic

__all__ = ["GPT", "Bert", "ViT", "Speech", "SpeechSeq2Seq", "from_pretrained", "load_config", "default_config",
           "ZooModel"]

ConfigLike = Union[None, str, os.PathLike, Mapping[str, Any]]


def default_config(model_type: str, attention: str = "dense") -> dict:
    """The complete default config of a model kind, as a dict, with every
    parameter of the attention kind ``attention`` at its default (the
    kinds: docs/attention-kinds.md)."""
    return json.loads(_C.canonical_config(json.dumps({"model_type": model_type, "attention": {"kind": attention}})))


def load_config(config: ConfigLike, model_type: Optional[str] = None, **overrides) -> dict:
    """A validated, complete config dict from a dict, a config.json path or a
    checkpoint directory, with keyword overrides applied. Bad keys or values
    raise ValueError naming the key."""
    if config is None:
        config = {}
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, a path to config.json or a directory, got {type(config).__name__}")
    config = dict(config)
    config.update(overrides)
    if model_type is not None:
        given = config.setdefault("model_type", model_type)
        if given != model_type:
            raise ValueError(f"config: 'model_type' is {given!r}, expected {model_type!r}")
    return json.loads(_C.canonical_config(json.dumps(config)))


class _ParameterSlots(dict):
    """A facade's ``_parameters``: assigning a slot writes through to the C++
    module (``_C.replace_parameter``), so what the C++ forward reads is always
    what the facade holds. FSDP2 swaps sharded and gathered parameters in
    here; ``module.weight = nn.Parameter(...)`` lands here too. Removing or
    adding a slot is refused: the C++ forward would never see a parameter
    computed or added on the Python side."""

    def __init__(self, cpp_module, owner_name: str):
        super().__init__(cpp_module._parameters.items())
        self._cpp = cpp_module
        self._owner = owner_name

    def __setitem__(self, name, value):
        if name not in self:
            raise KeyError(f"{self._owner}: cannot add parameter {name!r}: the C++ forward would never read it")
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{self._owner}: parameter {name!r} must be a tensor, got {type(value).__name__}")
        _C.replace_parameter(self._cpp, name, value)
        super().__setitem__(name, value)

    def _refuse_removal(self, name, *args):
        raise RuntimeError(
            f"{self._owner}: removing parameter {name!r} is not supported. attnzoo's C++ forward reads the "
            "C++ module's parameters, so a parameter computed on the Python side "
            "(torch.nn.utils.parametrize, weight_norm, spectral_norm, pruning) would never be used; "
            "assign another nn.Parameter of the same shape instead")

    __delitem__ = pop = _refuse_removal

    def popitem(self):
        self._refuse_removal(next(reversed(self), None))

    def clear(self):
        if self:
            self._refuse_removal(next(iter(self)))

    def update(self, *args, **kwargs):
        for name, value in dict(*args, **kwargs).items():
            self[name] = value

    def setdefault(self, name, value=None):
        if name not in self:
            self[name] = value
        return self[name]


class CppModule(nn.Module):
    """A generic nn.Module over a C++ torch::nn::Module, sharing its tensors."""

    def __init__(self, cpp_module):
        super().__init__()
        self._cpp = cpp_module
        self._parameters = _ParameterSlots(cpp_module, self._get_name())
        for name, tensor in cpp_module._buffers.items():
            self._buffers[name] = tensor
        for name, child in cpp_module._modules.items():
            kind = CppModuleList if _C.is_module_list(child) else (
                TransformerBlock if _C.is_transformer_block(child) else CppModule)
            self._modules[name] = kind(child)
        self.training = cpp_module.training

    def train(self, mode: bool = True):
        self._cpp.train(mode)  # recursive on the C++ side
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # Change the tensors in place (as torch.nn.cpp.ModuleWrapper does): the
        # C++ module keeps pointing at them.
        for param in self.parameters():
            param.data = fn(param.data)
            if param.grad is not None:
                param.grad.data = fn(param.grad.data)
        for buf in self.buffers():
            buf.data = fn(buf.data)
        return self

    def _get_name(self) -> str:
        # "torch::nn::LinearImpl" -> "Linear", "attnzoo::nn::MultiHeadAttentionImpl" -> "MultiHeadAttention"
        name = repr(self._cpp).rsplit("::", 1)[-1]
        return name[:-4] if name.endswith("Impl") else name

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(p.shape)}" for n, p in self._parameters.items())


class CppModuleList(CppModule):
    """A C++ torch::nn::ModuleList: indexable and iterable like nn.ModuleList."""

    def __getitem__(self, index: int) -> CppModule:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class TransformerBlock(CppModule):
    """A transformer block. The C++ model calls each block through this
    facade (``ZooModel`` installs the runner), so that hooks on it run:
    FSDP2's gathering of the block's parameters, activation checkpointing and
    a user's forward hooks."""

    checkpoint_activations = False  # set by ZooModel.gradient_checkpointing_enable()

    def forward(self, hidden_states: torch.Tensor, call: "_C.LayerCall") -> torch.Tensor:
        """hidden_states (B, N, C) -> (B, N, C); ``call`` carries the layer's
        attention inputs (padding mask, causality, cache) from the C++ model."""
        return _C.run_block(self._cpp, hidden_states, call)


def _layer_runner(blocks):
    # Holds the block facades, not the model: the C++ model keeps this
    # function, and a reference back to its own facade would be a cycle that
    # Python's collector cannot see through C++.
    def run(layer, hidden_states, call):
        block = blocks[layer]
        if block.checkpoint_activations and block.training and torch.is_grad_enabled():
            # Keeps only the block's input; the backward pass runs the block
            # again (same dropout: the RNG state is restored for the replay).
            return torch.utils.checkpoint.checkpoint(block, hidden_states, call, use_reentrant=False)
        return block(hidden_states, call)

    return run


class ZooModel(CppModule):
    """Shared behaviour of GPT, Bert, ViT and Speech."""

    model_type: str = ""
    _cpp_class = None

    def __init__(self, config: ConfigLike = None, **overrides):
        cfg = load_config(config, self.model_type, **overrides)
        super().__init__(self._cpp_class(json.dumps(cfg)))
        self._cpp.set_layer_runner(_layer_runner(self._blocks()))

    @classmethod
    def _wrap(cls, cpp_model) -> "ZooModel":
        model = cls.__new__(cls)
        CppModule.__init__(model, cpp_model)
        cpp_model.set_layer_runner(_layer_runner(model._blocks()))
        return model

    def _blocks(self) -> tuple:
        """Every transformer block, in the C++ model's layer numbering: the
        layers, then a decoder's."""
        return tuple(self.layers) + tuple(getattr(self, "decoder_layers", ()))

    @property
    def config(self) -> dict:
        return json.loads(self._cpp.config_json())

    @contextlib.contextmanager
    def _outside_forward(self, method: str):
        """Around a method that reaches the C++ model without going through
        ``model(...)``. FSDP2 gathers the model's own (non-block) parameters
        in its forward hooks, so here they are gathered explicitly; for
        inference only, because the gradients' reduce-scatter is also set up
        by those hooks, and training through this method would leave the
        shards without gradients."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self, FSDPModule):
            yield
            return
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise RuntimeError(f"{type(self).__name__}.{method}: under FSDP2 only model(...) trains; call "
                               f"{method} under torch.no_grad() (or train through forward)")
        self.unshard()
        try:
            yield
        finally:
            self.reshard()

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing per transformer block (as HF names it):
        in training, each block keeps only its input and runs again in the
        backward pass, trading about one more forward for the activations'
        memory (docs/training.md has the numbers)."""
        for block in self._blocks():
            block.checkpoint_activations = True

    def gradient_checkpointing_disable(self) -> None:
        for block in self._blocks():
            block.checkpoint_activations = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(block.checkpoint_activations for block in self._blocks())

    @torch.no_grad()
    def attention_maps(self, *inputs, **kwargs) -> list:
        """Runs forward(*inputs, **kwargs) and returns each layer's
        self-attention probabilities (B, heads, N, N), computed from that
        layer's own input; None for a layer whose kind never forms them
        (lsh, linformer, linear, longformer, shaw, block_sparse)."""
        self._cpp.record_attention(True)
        try:
            with self._outside_forward("attention_maps"):
                self.forward(*inputs, **kwargs)
        finally:
            self._cpp.record_attention(False)
        return list(self._cpp.take_attention_maps())

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Writes directory/config.json and directory/model.safetensors (each
        to a temporary file renamed into place). A model sharded by FSDP2 is
        gathered first: call this on every rank; rank 0 writes one unsharded
        checkpoint that any reader (Python or C++) loads."""
        state = self._full_state()
        if state is not None:  # None: a sharded model's other ranks (rank 0 writes)
            self._write_pretrained(directory, state)

    def _write_pretrained(self, directory, state: dict) -> None:
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write(os.path.join(directory, "model.safetensors"),
                      lambda tmp: save_file(state, tmp, metadata={"format": "pt", "producer": "attnzoo"}))
        text = self._cpp.config_json()
        write_text_atomic(os.path.join(directory, "config.json"), text)

    def _full_state(self) -> Optional[dict]:
        """The unsharded state dict; for a model sharded by FSDP2 (its
        parameters are DTensors) gathered to rank 0, with None on the others."""
        from torch.distributed.tensor import DTensor

        if not any(isinstance(p, DTensor) for p in self.parameters()):
            return self.state_dict()
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if dist.get_rank() == 0 else None

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "ZooModel":
        """Loads a checkpoint directory strictly (missing or unexpected keys are
        errors). The model comes back in eval mode, as HF's do: call
        ``.train()`` to fine-tune."""
        from ._files import load_safetensors

        directory = os.fspath(directory)
        model = cls(os.path.join(directory, "config.json"))
        model.load_state_dict(load_safetensors(os.path.join(directory, "model.safetensors")), strict=True)
        return model.eval()


class GPT(ZooModel):
    """Causal language model: token (+ position) embeddings, pre-LN blocks, tied LM head."""

    model_type = "gpt"
    _cpp_class = _C.GPT

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, N) -> logits (B, N, vocab_size)."""
        return self._cpp.forward(input_ids, attention_mask)

    def forward_cached(self, input_ids: torch.Tensor, cache: "_C.KVCache") -> torch.Tensor:
        """Logits of input_ids continuing the sequence held by ``cache`` (a
        ``attnzoo._C.KVCache()``, filled in)."""
        with self._outside_forward("forward_cached"):
            return self._cpp.forward_cached(input_ids, cache)

    @property
    def supports_kv_cache(self) -> bool:
        return self._cpp.supports_kv_cache()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None, use_cache: bool = True,
                 seed: Optional[int] = None) -> torch.Tensor:
        """Continues input_ids (B, N) by up to max_new_tokens tokens: greedy when
        temperature is 0, else sampled (top_k / top_p). Rows that emit eos are
        padded with eos; generation stops when every row has. Attention kinds
        without a KV cache (lsh, linear) recompute the whole prefix per token."""
        with self._outside_forward("generate"):
            return self._cpp.generate(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, use_cache,
                                      seed)


class Bert(ZooModel):
    """Bidirectional encoder with a masked-LM head (tied) and an optional classification head."""

    model_type = "bert"
    _cpp_class = _C.Bert

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, predict_mask=None) -> torch.Tensor:
        """Masked-LM logits (B, N, vocab_size); with predict_mask (B, N) bool,
        only those positions' logits (count, vocab_size), the head skipping the rest."""
        return self._cpp.forward(input_ids, attention_mask, token_type_ids, predict_mask)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        with self._outside_forward("encode"):
            return self._cpp.encode(input_ids, attention_mask, token_type_ids)

    def classify(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Sequence-classification logits (B, num_labels)."""
        with self._outside_forward("classify"):
            return self._cpp.classify(input_ids, attention_mask, token_type_ids)


class ViT(ZooModel):
    """Vision transformer: conv patch embedding, CLS token, pre-LN blocks, classifier."""

    model_type = "vit"
    _cpp_class = _C.ViT

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, channels, H, W) -> logits (B, num_labels)."""
        return self._cpp.forward(pixel_values)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self._outside_forward("encode"):
            return self._cpp.encode(pixel_values)


class Speech(ZooModel):
    """CTC speech recogniser: log-mel front end, conv subsampling, encoder, CTC head."""

    model_type = "speech"
    _cpp_class = _C.Speech

    def forward(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """waveforms (B, samples) -> (log-probabilities (B, T, vocab), frame lengths (B,))."""
        return self._cpp.forward(waveforms, lengths)

    def features(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        return self._cpp.features(waveforms, lengths)

    def greedy_decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list:
        return self._cpp.greedy_decode(log_probs, lengths)


class SpeechSeq2Seq(Speech):
    """Speech encoder-decoder: the Speech encoder and CTC head, and a causal
    character decoder whose blocks cross-attend to the encoder's output."""

    model_type = "speech_seq2seq"
    _cpp_class = _C.SpeechSeq2Seq

    def forward(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor], decoder_input_ids: torch.Tensor):
        """Teacher forcing: decoder_input_ids (B, N), the start token then the
        transcript -> (decoder logits (B, N, vocab), CTC log-probabilities
        (B, T, vocab), frame lengths (B,))."""
        return self._cpp.forward(waveforms, lengths, decoder_input_ids)

    def ctc(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """The encoder's CTC head alone: (log-probabilities (B, T, vocab), frame lengths (B,))."""
        with self._outside_forward("ctc"):
            return self._cpp.ctc(waveforms, lengths)

    def encode(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None):
        """The encoder's output (B, T, hidden) and frame lengths (B,)."""
        with self._outside_forward("encode"):
            return self._cpp.encode(waveforms, lengths)

    def decode(self, decoder_input_ids, encoded, frames, cache: Optional["_C.KVCache"] = None) -> torch.Tensor:
        """Decoder logits (B, N, vocab) over encode()'s output; with a cache
        (``attnzoo._C.KVCache()``), decoder_input_ids continue the tokens it holds."""
        with self._outside_forward("decode"):
            return self._cpp.decode(decoder_input_ids, encoded, frames, cache)

    @property
    def supports_kv_cache(self) -> bool:
        return self._cpp.supports_kv_cache()

    @torch.no_grad()
    def transcribe(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None, *, beam_size: int = 1,
                   max_length: int = 0, length_penalty: float = 1.0, use_cache: bool = True,
                   ctc_weight: float = 0.0) -> list:
        """Label ids of each utterance's transcript (without the start and end
        tokens): greedy, or beam search with beam_size beams, ranking ended
        transcripts by log-probability / length**length_penalty. max_length
        caps the characters (0: the encoder's frame count). With ctc_weight
        w > 0 the beam search is joint CTC/attention decoding: continuations
        score (1 - w) * decoder log-probability + w * CTC prefix score. The
        decoder's self-attention keys and values are cached, the
        cross-attention's computed once."""
        with self._outside_forward("transcribe"):
            return self._cpp.transcribe(waveforms, lengths, beam_size, max_length, length_penalty, use_cache,
                                        ctc_weight)

    @torch.no_grad()
    def cross_attention_maps(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor],
                             decoder_input_ids: torch.Tensor) -> list:
        """Runs forward and returns each decoder layer's cross-attention
        probabilities (B, heads, characters, frames); None for a linear layer."""
        self._cpp.record_attention(True)
        try:
            with self._outside_forward("cross_attention_maps"):
                self.forward(waveforms, lengths, decoder_input_ids)
        finally:
            self._cpp.record_attention(False)
            self._cpp.take_attention_maps()
        return list(self._cpp.take_cross_attention_maps())


MODEL_CLASSES = {cls.model_type: cls for cls in (GPT, Bert, ViT, Speech, SpeechSeq2Seq)}


def from_pretrained(directory: Union[str, os.PathLike]) -> ZooModel:
    """Loads a checkpoint directory, in eval mode; the model kind comes from its config.json."""
    config = load_config(directory)
    return MODEL_CLASSES[config["model_type"]].from_pretrained(directory)


def from_pretrained_cpp(directory: Union[str, os.PathLike]) -> ZooModel:
    """The same through the C++ reader (attnzoo::from_pretrained), also in eval mode."""
    cpp = _C.from_pretrained(os.fspath(directory))
    return MODEL_CLASSES[json.loads(cpp.config_json())["model_type"]]._wrap(cpp)
