"""Batching rules (torch.vmap) for the dense attention ops.

Without them torch.vmap runs the ops once per sample (torch's slow fallback,
with a warning), and torch.func.jacrev, which vmaps the backward over the
rows of the Jacobian, is slow too. The rule folds the vmapped dimension into
the batch: q, k, v (and, in the backward, grad_out, out, lse) become
(V * B, ...), and mask, bias and ALiBi slopes are expanded to (V, B, ...)
first, so that each of the V samples keeps its own (and, in the backward,
gets its own bias gradient).

Shared tables have no batch dimension to fold into (a 4-D layout's batch
dimension is repeated V times): when t5_table, shaw_k, shaw_v or the layout
(with its block masks) is itself vmapped, or the backward is asked for a table's
gradient (which must come back per sample), the op runs per sample, with a
warning, as torch's fallback would.

``torch.library.register_vmap`` refuses ops with keyword-only tensors (all of
attention's options are), so the rule is registered for the FuncTorchBatched
key directly, with the helpers torch's own register_vmap is built on.
"""
from __future__ import annotations

import warnings

import torch
from torch._C._functorch import _add_batch_dim, _unwrap_batched
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

# Option tensors broadcast against (B, H, Nq, Nk) or (B, H): expanded and folded.
_PER_BATCH_OPTIONS = {"mask": 4, "bias": 4, "alibi_slopes": 2}
# Option tensors without a batch dimension: shared by the whole batch.
_SHARED_OPTIONS = ("t5_table", "layout", "block_mask_index", "block_masks", "shaw_k", "shaw_v")
# Shared options that may still carry a batch dimension of their own (a 4-D
# layout, one per batch entry): repeated for each of the V samples.
_PER_BATCH_LAYOUTS = ("layout", "block_mask_index")
# _attention_backward's results after grad_q, grad_k, grad_v, and the option
# each is the gradient of (output_mask has the same order).
_OPTION_GRADS = ("bias", "t5_table", "shaw_k", "shaw_v")

_lib = torch.library.Library("attnzoo", "FRAGMENT")


def _below_vmap():
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched))


def _unwrap(value, level):
    if isinstance(value, torch.Tensor):
        return _unwrap_batched(value, level)
    return value, None


def _fold(t, dim, V):
    """(B, ...) with vmap dim `dim` (or None) -> (V * B, ...)."""
    t = t.movedim(dim, 0) if dim is not None else t.expand(V, *t.shape)
    return t.reshape(V * t.shape[1], *t.shape[2:])


def _fold_option(t, dim, V, B, rank):
    """An option broadcast against `rank` leading-batch dims -> (V * B, ...)."""
    t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0)
    while t.dim() < rank + 1:
        t = t.unsqueeze(1)
    t = t.expand(V, B, *t.shape[2:])
    return t.reshape(V * B, *t.shape[2:])


def _per_sample(op, args, arg_dims, kwargs, kwarg_dims, V, why):
    warnings.warn(f"attnzoo: vmap over {op._schema.name} with {why} runs once per sample", stacklevel=3)

    def pick(value, dim, i):
        return value.select(dim, i) if dim is not None else value

    results = []
    for i in range(V):
        sample_args = [pick(a, d, i) for a, d in zip(args, arg_dims)]
        sample_kwargs = {n: pick(kwargs[n], kwarg_dims[n], i) for n in kwargs}
        result = op(*sample_args, **sample_kwargs)
        results.append(result if isinstance(result, tuple) else (result,))
    stacked = tuple(torch.stack([r[j] for r in results]) for j in range(len(results[0])))
    return stacked, (0,) * len(stacked)


def _per_sample_reason(kwargs, kwarg_dims, backward):
    """Why the op must run once per sample (a shared table that is vmapped,
    or whose gradient must come back per sample), or None when it folds."""
    batched_tables = [n for n in _SHARED_OPTIONS if kwarg_dims.get(n) is not None]
    if batched_tables:
        return "a vmapped " + ", ".join(batched_tables)
    output_mask = kwargs.get("output_mask", [False] * 4) if backward else [False] * 4
    table_grads = [n for n, want in zip(_OPTION_GRADS[1:], output_mask[1:]) if want and kwargs.get(n) is not None]
    return ("the gradient of " + ", ".join(table_grads)) if table_grads else None


def _folded(op, backward, args, arg_dims, kwargs, kwarg_dims, V):
    """The op on the vmapped dimension folded into the batch; its outputs and
    their vmap dims."""
    # Every positional argument is a (B, ...) tensor (or None: grad_lse).
    q_index = 2 if backward else 0
    q, q_dim = args[q_index], arg_dims[q_index]
    B = q.shape[0] if q_dim is None else q.movedim(q_dim, 0).shape[1]
    folded_args = [a if a is None else _fold(a, d, V) for a, d in zip(args, arg_dims)]
    folded_kwargs = dict(kwargs)
    for n, rank in _PER_BATCH_OPTIONS.items():
        if kwargs.get(n) is not None:
            folded_kwargs[n] = _fold_option(kwargs[n], kwarg_dims[n], V, B, rank)
    for n in _PER_BATCH_LAYOUTS:  # folded index v * B + b reads entry b
        t = kwargs.get(n)
        if t is not None and t.dim() == 4 and t.shape[0] > 1:
            folded_kwargs[n] = t.repeat(V, 1, 1, 1)
    result = op(*folded_args, **folded_kwargs)
    outputs = result if isinstance(result, tuple) else (result,)
    if not backward:  # every output is (V * B, ...)
        return tuple(o.reshape(V, B, *o.shape[1:]) for o in outputs), (0,) * len(outputs)
    # The backward: grad_q, grad_k and grad_v are (V * B, ...); the option
    # gradients not asked for are empty, the same for every sample.
    unfolded = [o.reshape(V, B, *o.shape[1:]) for o in outputs[:3]]
    out_dims = [0, 0, 0]
    bias, grad_bias = kwargs.get("bias"), outputs[3]
    if kwargs["output_mask"][0] and bias is not None:
        # grad_bias comes back for the folded (V * B, ...) bias: summed to
        # each sample's own bias shape.
        per_sample = bias.movedim(kwarg_dims["bias"], 0).shape[1:] if kwarg_dims["bias"] is not None else bias.shape
        padded = (1,) * (4 - len(per_sample)) + tuple(per_sample)
        grad_bias = grad_bias.reshape(V, B, *grad_bias.shape[1:]).sum_to_size(V, *padded).reshape(V, *per_sample)
        out_dims.append(0)
    else:
        out_dims.append(None)
    return tuple(unfolded + [grad_bias, *outputs[4:]]), tuple(out_dims + [None] * 3)


def _register(name):
    op = getattr(torch.ops.attnzoo, name).default
    backward = name == "_attention_backward"

    def rule(keyset, *args, **kwargs):
        interpreter = retrieve_current_functorch_interpreter()
        level, V = interpreter.level(), interpreter.batch_size()
        unwrapped = [_unwrap(a, level) for a in args]
        args_u, arg_dims = [u for u, _ in unwrapped], [d for _, d in unwrapped]
        kw_unwrapped = {n: _unwrap(v, level) for n, v in kwargs.items()}
        kwargs_u = {n: u for n, (u, _) in kw_unwrapped.items()}
        kwarg_dims = {n: d for n, (_, d) in kw_unwrapped.items()}
        if all(d is None for d in arg_dims) and all(d is None for d in kwarg_dims.values()):
            with _below_vmap():
                return op(*args, **kwargs)

        # Folding gives every sample its own dropout pattern: right for
        # randomness="different", and for "error" when the pattern comes from
        # a seed drawn outside (the autograd forward and its backward).
        randomness = interpreter.randomness()
        if kwargs.get("dropout_p", 0.0) > 0 and (randomness == "same" or
                                                 (randomness == "error" and kwargs.get("seed") is None)):
            raise RuntimeError(f"attnzoo.{name}: dropout under vmap needs randomness='different' (each sample "
                               f"draws its own pattern), got randomness='{randomness}'")
        with _below_vmap():
            why = _per_sample_reason(kwargs, kwarg_dims, backward)
            if why:
                outputs, out_dims = _per_sample(op, args_u, arg_dims, kwargs_u, kwarg_dims, V, why)
            else:
                outputs, out_dims = _folded(op, backward, args_u, arg_dims, kwargs_u, kwarg_dims, V)
        wrapped = tuple(o if d is None else _add_batch_dim(o, d, level) for o, d in zip(outputs, out_dims))
        return wrapped if len(wrapped) > 1 else wrapped[0]

    _lib.impl(name, rule, "FuncTorchBatched", with_keyset=True)


for _name in ("attention", "attention_weights", "_attention_forward", "_attention_backward"):
    _register(_name)


def _register_batch_fold(name):
    """Ops whose every tensor argument and result is (B, ...) per sample (the
    causal linear attention core; its int feature map passes through): the
    vmapped dimension folds into B."""
    op = getattr(torch.ops.attnzoo, name).default

    def rule(keyset, *args):
        interpreter = retrieve_current_functorch_interpreter()
        level, V = interpreter.level(), interpreter.batch_size()
        unwrapped = [_unwrap(a, level) for a in args]
        with _below_vmap():
            B = next(u.shape[0] if d is None else u.movedim(d, 0).shape[1] for u, d in unwrapped
                     if isinstance(u, torch.Tensor))
            result = op(*[_fold(u, d, V) if isinstance(u, torch.Tensor) else u for u, d in unwrapped])
        outputs = result if isinstance(result, tuple) else (result,)
        wrapped = tuple(_add_batch_dim(o.reshape(V, B, *o.shape[1:]), 0, level) for o in outputs)
        return wrapped if len(wrapped) > 1 else wrapped[0]

    _lib.impl(name, rule, "FuncTorchBatched", with_keyset=True)


for _name in ("_causal_linear", "_causal_linear_backward"):
    _register_batch_fold(_name)
