"""attnzoo as a Hugging Face ``transformers`` attention backend.

    import attnzoo.integrations.transformers as hf_attnzoo
    hf_attnzoo.register()                       # adds "attnzoo" to HF's AttentionInterface
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnzoo")
    # or: model.set_attn_implementation("attnzoo")

:func:`register` adds two functions under one name:

* :func:`attention_forward` to ``AttentionInterface``: HF's attention call
  (``module, query, key, value, attention_mask, dropout, scaling, ...``,
  tensors (B, H, N, D)) mapped onto :func:`attnzoo.attention`. Key/value heads
  are not repeated (the op does GQA itself, no ``repeat_kv``); the
  output is (B, Nq, H, Dv), contiguous, and the weights are ``None``, as HF's
  ``sdpa`` returns them.
* :func:`attention_mask` to ``AttentionMaskInterface``: HF builds the masks
  of a model once per forward through it. It returns ``None`` where the mask
  is exactly what the kernel computes from flags, so no N x N mask is built or
  read: plain causal without padding (``causal=True``), sliding-window causal
  without padding (``window=(sliding_window - 1, 0)``, HF's window: key j is
  visible from query i iff i - sliding_window < j <= i) and bidirectional
  without padding. Otherwise it is sdpa's boolean mask (True = may attend).

A ``None`` mask with causal attention means bottom-right-aligned causal (the
last query sees every key: the geometry of a growing KV cache); the mask
function returns ``None`` only when HF's positions have that geometry.

Arguments that attnzoo cannot reproduce raise :class:`UnsupportedArgument`
(a ``ValueError`` and a ``NotImplementedError``) naming the argument:
``softcap`` (Gemma 2 logit soft-capping), ``s_aux`` (attention sinks),
``head_mask`` and ``output_attentions=True`` (there are no weights to
return).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import attention as _attention

__all__ = ["register", "attention_forward", "attention_mask", "UnsupportedArgument", "NAME"]

NAME = "attnzoo"


class UnsupportedArgument(ValueError, NotImplementedError):
    """An HF attention argument that the attnzoo backend cannot reproduce."""


def _unsupported(arg: str, why: str) -> UnsupportedArgument:
    return UnsupportedArgument(f"attn_implementation='attnzoo' does not support `{arg}`: {why}. "
                               "Use attn_implementation='eager' for this model or call.")


def attention_forward(
    module: Optional[torch.nn.Module],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    position_bias: Optional[Tensor] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """HF's attention function signature -> :func:`attnzoo.attention`.

    query (B, H, Nq, D); key, value (B, Hkv, Nk, D / Dv), H % Hkv == 0.
    ``attention_mask``: ``None`` (see the module docstring), bool (True = may
    attend) or float (added to the scores, as HF's eager masks and custom 4D
    masks are), broadcastable to (B, H, Nq, Nk). ``position_bias`` (T5) is
    added to the scores, differentiably. ``is_causal`` defaults to
    ``module.is_causal`` (True if absent) and applies only without a mask, as
    in HF's sdpa. ``sliding_window`` (keyword, from the model) applies
    likewise. ``dropout`` applies only while ``module.training``.
    Returns ((B, Nq, H, Dv) contiguous, None).
    """
    if kwargs.get("softcap") is not None:
        raise _unsupported("softcap", "logit soft-capping (tanh of the scores) is not in the fused kernel")
    if kwargs.get("s_aux") is not None:
        raise _unsupported("s_aux", "attention sinks (a learned extra logit per head) are not in the fused kernel")
    if kwargs.get("head_mask") is not None:
        raise _unsupported("head_mask", "per-head multiplication of the probabilities is not in the fused kernel")
    if kwargs.get("output_attentions"):
        raise _unsupported("output_attentions=True", "the fused kernel never forms the attention weights")
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise _unsupported(f"attention_mask of type {type(attention_mask).__name__}",
                           "only a tensor (bool or additive float) or None can be mapped")

    nk = key.shape[-2]
    mask = bias = window = None
    causal = False
    if attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        sliding_window = kwargs.get("sliding_window")
        if causal and sliding_window is not None and sliding_window < nk:
            window = (int(sliding_window) - 1, 0)
    else:
        if attention_mask.shape[-1] > nk:  # a static cache's mask may be longer than the keys it holds
            attention_mask = attention_mask[..., :nk]
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias

    training = getattr(module, "training", True)
    dropout_p = float(dropout) if training else 0.0
    # HF's q, k, v are transposed views of the projections: the kernel reads
    # contiguous tensors and would copy them in the forward and again in the
    # backward (from the inputs it saved); copied here, the backward gets the
    # contiguous ones.
    out = _attention(query.contiguous(), key.contiguous(), value.contiguous(), mask=mask, bias=bias,
                     causal=causal, window=window, dropout_p=dropout_p, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_padding(padding_mask: Optional[Tensor], kv_length: int, kv_offset: int) -> bool:
    """True if no key in [kv_offset, kv_offset + kv_length) is padding; False
    also when that cannot be read without a graph break (tracing)."""
    from transformers.utils.import_utils import is_tracing

    if padding_mask is None:
        return True
    if is_tracing(padding_mask):
        return False
    return bool(padding_mask[:, kv_offset:kv_offset + kv_length].all())


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
) -> Optional[Tensor]:
    """HF's mask-interface signature (as ``masking_utils.sdpa_mask``).

    Returns ``None`` when the mask equals what :func:`attention_forward`
    derives from flags (causal, the layer's ``sliding_window``, or nothing),
    else sdpa's boolean (batch, 1, q_length, kv_length) mask."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask
    from transformers.utils.import_utils import is_tracing

    if mask_function is None:
        mask_function = causal_mask_function
    padding_mask = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    static = isinstance(q_offset, int) and isinstance(kv_offset, int)
    if static and _no_padding(padding_mask, kv_length, kv_offset):
        # the kernel's causal/window flags are bottom-right aligned: the last
        # query and the last key are the same position
        bottom_right = q_offset + q_length == kv_offset + kv_length
        if allow_is_causal_skip and bottom_right:
            if local_size is None and mask_function is causal_mask_function:
                return None
            if local_size is not None and not is_tracing():
                # sliding-window (or chunked) causal: skip only if the pattern is
                # exactly HF's window i - local_size < j <= i (checked once per
                # forward, for all layers)
                full = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                 kv_offset=kv_offset, mask_function=mask_function, attention_mask=None,
                                 allow_is_causal_skip=False, use_vmap=use_vmap, device=device)
                i = torch.arange(q_length, device=full.device)[:, None] + (kv_length - q_length)
                j = torch.arange(kv_length, device=full.device)[None, :]
                expected = (j <= i) & (j > i - local_size)
                return None if bool((full == expected).all()) else full
        if allow_is_bidirectional_skip and (local_size is None or kv_length < local_size):
            return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device)


def register(name: str = NAME) -> str:
    """Register :func:`attention_forward` and :func:`attention_mask` with HF
    ``transformers`` under ``name`` (for every model in this process); then
    ``attn_implementation=name`` works in ``from_pretrained``/``from_config``
    and ``model.set_attn_implementation(name)``. Idempotent; returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name
