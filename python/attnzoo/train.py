"""Pretraining with exact resume, on one process or many (torchrun + DDP).

    python -m attnzoo pretrain models/gpt-kjv --out runs/gpt-kjv --steps 2000
    torchrun --nproc_per_node=2 -m attnzoo pretrain models/vit-digits --out runs/vit

A run directory holds:
  run.json                   the options and model config of the run
  metrics.jsonl              one JSON object per logged step / evaluation
  loss.png                   training and validation loss
  checkpoints/step-NNNNNN/   config.json, model.safetensors, tokenizer, trainer_state.{json,safetensors}
  last -> checkpoints/...    the newest complete checkpoint
  best -> checkpoints/...    the one with the best validation metric

Checkpoints are written under a temporary name and renamed; the `last` and
`best` links are replaced atomically. A run killed at any point (even by
SIGKILL) resumes from `last` when the same command is run again, and
continues exactly as the uninterrupted run would have: model, optimizer,
schedule, random generators and the data position are all restored. Nothing
is pickled: tensors go to safetensors, the rest to JSON.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from . import models
from ._files import atomic_write, write_text_atomic
from .tasks import HEADLINE, shard, task_for

__all__ = ["TrainOptions", "pretrain", "recommended_options"]


# Training in bfloat16 runs the forward and backward on a bfloat16 copy of
# the model, under autocast (so the loss and the other ops autocast keeps in
# float32 stay float32), and keeps the float32 model as the master weights:
# each step's bfloat16 gradients are added into the master's float32 ones,
# clipping and AdamW run there, and the master's new weights are rounded into
# the copy. The checkpoints, the optimizer state and resume are therefore
# those of a float32 run. Autocast over the float32 model alone (what this
# was before) casts every weight and the residual stream's activations at
# every use: vit-digits trained 1.27x faster with the copy, interleaved in
# one process (docs/benchmarks.md). FSDP2 keeps plain autocast over its
# float32 shards.
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_context(dtype: str, device: str = "cpu"):
    """The context a training forward pass runs in for TrainOptions.dtype."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Bfloat16Copy:
    """The bfloat16 copy of `master` that a bfloat16 run computes with."""

    def __init__(self, master, config: dict, checkpoint_activations: bool):
        with torch.random.fork_rng(devices=[]):  # the constructor's init must not move the run's RNG
            self.model = models.MODEL_CLASSES[config["model_type"]](config)
        self.model.load_state_dict(master.state_dict())
        self.model.to(device=next(master.parameters()).device, dtype=torch.bfloat16)
        if checkpoint_activations:
            self.model.gradient_checkpointing_enable()
        names = dict(self.model.named_parameters())
        self.pairs = [(p, names[n]) for n, p in master.named_parameters()]
        self.model.train(master.training)

    def gradients_to_master(self):
        """Adds the copy's gradients into the master's (in float32) and
        clears them."""
        for master, copy in self.pairs:
            if copy.grad is None:
                continue
            if master.grad is None:
                master.grad = copy.grad.to(torch.float32)
            else:
                master.grad.add_(copy.grad)
            copy.grad = None

    @torch.no_grad()
    def weights_from_master(self):
        torch._foreach_copy_([c for _, c in self.pairs], [m for m, _ in self.pairs])


def _dtype_label(dtype: str, bf16_copy) -> str:
    if dtype != "bfloat16":
        return ""
    return ", bfloat16 weights over float32 master weights" if bf16_copy else ", bfloat16 autocast"


@dataclasses.dataclass
class TrainOptions:
    steps: int = 2000
    batch_size: int = 32          # global batch (split over processes), per optimizer step / grad_accum
    grad_accum: int = 1           # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-4          # the cosine schedule's floor
    warmup_steps: int = 100
    weight_decay: float = 0.1     # on matrices only (not biases, norms or 1-D tensors)
    grad_clip: float = 1.0        # max global gradient norm (0 = off)
    eval_every: int = 200
    eval_batches: int = 16        # validation batches per evaluation (0 = the whole split)
    patience: int = 0             # stop after this many evaluations without improvement (0 = never)
    seed: int = 0
    seq_len: int = 0              # text models: window length (0 = min(max_position_embeddings, 256))
    seq_len_start: int = 0        # GPT: short-to-long curriculum from this window length (0 = off; curriculum())
    data_fraction: float = 1.0    # use only the first part of every split (quick trials, tests)
    log_every: int = 10
    mask_prob: float = 0.15       # bert: fraction of tokens masked in training (evaluation always masks 15%)
    dtype: str = "float32"        # training compute: float32, or bfloat16 (a bfloat16 copy; float32 master weights)

    def validate(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_batches", "patience", "seq_len", "seq_len_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 < self.data_fraction <= 1:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")


def curriculum(step: int, o: TrainOptions, seq_len: int):
    """(window length, windows per step) at `step`. With seq_len_start, a
    short-to-long curriculum: the length starts there and doubles stage by
    stage while below seq_len, the stages sharing the first half of the
    steps equally, seq_len for the second half; each stage takes as many more windows as keeps the characters per
    step those of batch_size windows of seq_len. Evaluation always uses
    seq_len. A function of the step alone, so a resumed run continues it."""
    if not o.seq_len_start or o.seq_len_start >= seq_len:
        return seq_len, o.batch_size
    lengths = []
    length = o.seq_len_start
    while length < seq_len:
        lengths.append(length)
        length *= 2
    stage = step * len(lengths) // max(1, o.steps // 2)
    if stage >= len(lengths):
        return seq_len, o.batch_size
    return lengths[stage], o.batch_size * seq_len // lengths[stage]


def recommended_options(model_source) -> TrainOptions:
    """TrainOptions from train.json beside the model's config.json (the zoo's
    models/<name>/ carry one), else the defaults."""
    path = os.fspath(model_source)
    path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "train.json")
    if not os.path.exists(path):
        return TrainOptions()
    with open(path) as f:
        values = json.load(f)
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown training options {', '.join(unknown)}")
    return TrainOptions(**values)


def lr_at(step: int, o: TrainOptions) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------
# Trainer state <-> files (no pickle)

def _optimizer_state(model, optimizer, sharded):
    """The optimizer's state_dict with parameters numbered as
    optimizer.state_dict() numbers them; under FSDP2 gathered from every rank
    (a collective: call it on all ranks; the others get None)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    order = [name for group in full["param_groups"] for name in group["params"]]
    return {"state": {order.index(name): values for name, values in full["state"].items()},
            "param_groups": [{**group, "params": [order.index(n) for n in group["params"]]}
                             for group in full["param_groups"]]}


def _load_optimizer_state(model, optimizer, state, sharded):
    if not sharded:
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    full = {"state": {order[i]: values for i, values in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=full,
                             options=StateDictOptions(full_state_dict=True))


def _save_trainer_state(directory, step, state, data_generator, extra):
    from safetensors.torch import save_file

    tensors = {"rng.torch": torch.get_rng_state(), "rng.data": data_generator.get_state()}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, os.path.join(directory, "trainer_state.safetensors"))
    with open(os.path.join(directory, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "param_groups": state["param_groups"], **extra}, f, indent=1)


def _load_trainer_state(directory, model, optimizer, data_generator, sharded):
    from ._files import load_safetensors

    tensors = load_safetensors(os.path.join(directory, "trainer_state.safetensors"))
    with open(os.path.join(directory, "trainer_state.json")) as f:
        meta = json.load(f)
    state = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    _load_optimizer_state(model, optimizer, {"state": state, "param_groups": meta["param_groups"]}, sharded)
    torch.set_rng_state(tensors["rng.torch"])
    data_generator.set_state(tensors["rng.data"])
    return meta


def _replace_link(link, target):
    tmp = f"{link}.tmp.{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic


def _check_output_dir(out: str, model) -> None:
    """Fails before training when the run directory cannot hold checkpoints:
    not writable, too little free space, or a file size limit (quota, ulimit)
    below the largest checkpoint file, which is written once as a probe."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"pretrain: the output directory {out!r} is not writable: {e}") from None
    # A checkpoint holds the weights and AdamW's two moments; two may coexist (last, best) plus one being written.
    need = 3 * 3 * weights
    free = shutil.disk_usage(out).free
    if free < need:
        raise RuntimeError(f"pretrain: {out!r} has {free / 2**20:.1f} MiB free, checkpoints need about "
                           f"{need / 2**20:.1f} MiB")
    probe = os.path.join(out, f".write-test.{os.getpid()}")
    largest = 2 * weights + 4096  # trainer_state.safetensors: both moments
    try:
        with open(probe, "wb") as f:
            block = bytes(1 << 20)
            for start in range(0, largest, len(block)):
                f.write(block[: min(len(block), largest - start)])
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RuntimeError(f"pretrain: the output directory {out!r} cannot hold a checkpoint "
                           f"({largest / 2**20:.1f} MiB file): {e}") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)


# ---------------------------------------------------------------------------

class _Progress:
    """tqdm on a terminal, plain lines otherwise (logs, CI)."""

    def __init__(self, total, initial, enabled, log_every):
        self.enabled, self.log_every = enabled, log_every
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True)

    def update(self, step, text):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and step % self.log_every == 0:
            print(f"step {step}: {text}", file=sys.stderr, flush=True)

    def write(self, text):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _training_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be cpu or cuda[:N], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda: torch sees no CUDA device here")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _distributed(device: torch.device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def pretrain(model_source, out: str, options: Optional[TrainOptions] = None, attention: Optional[str] = None,
             model_overrides: Optional[dict] = None, cache: Optional[str] = None, quiet: bool = False,
             overwrite: bool = False, fsdp: bool = False, checkpoint_activations: bool = False,
             device: str = "cpu") -> dict:
    """Trains the run in `out`, or resumes it when `out` holds an interrupted
    run of the same model config and options (`steps` may differ: a finished
    run can be extended). A run of another config or other options is refused
    with the differences named, unless `overwrite` starts it over. Returns
    the final metrics. Under torchrun the processes split the batch, with DDP
    or, with `fsdp`, FSDP2 (parameters, gradients and optimizer state
    sharded; checkpoints are gathered, so either kind of run resumes the
    other's). `checkpoint_activations` recomputes each block in the backward
    pass instead of keeping its activations (same results, less memory).
    `device` ("cpu", "cuda", "cuda:1"; under torchrun "cuda" means each
    process's LOCAL_RANK GPU, with NCCL) is where the model trains; the
    data stay on the CPU and batches move there."""
    o = options or TrainOptions()
    o.validate()
    overrides = dict(model_overrides or {})
    if attention:
        overrides["attention"] = {"kind": attention}
    config = models.load_config(model_source, **overrides)
    started_group = not dist.is_initialized()
    device = _training_device(device)
    rank, world = _distributed(device)
    started_group = started_group and dist.is_initialized()
    main = rank == 0
    if o.batch_size % world:
        raise ValueError(f"batch_size {o.batch_size} must be divisible by the number of processes {world}")
    last = os.path.join(out, "last")
    resuming = os.path.exists(os.path.join(last, "trainer_state.json"))
    if resuming and overwrite:
        if main:
            _remove_run(out)
        if world > 1:
            dist.barrier()
        resuming = False
    if resuming:
        with open(os.path.join(out, "run.json")) as f:
            run = json.load(f)
        differences = _run_differences(run, config, o)
        if differences:
            raise ValueError(f"{out!r} holds a run of another configuration: {'; '.join(differences)}. "
                             "Run the command that started it to resume, choose another --out, or pass "
                             "--overwrite to start it over")
        o = dataclasses.replace(TrainOptions(**run["options"]), steps=o.steps)
    if o.warmup_steps >= o.steps:
        warnings.warn(f"warmup_steps ({o.warmup_steps}) >= steps ({o.steps}): the learning rate never leaves "
                      f"warm-up (it peaks at {lr_at(o.steps - 1, o):.3g}, not lr = {o.lr:.3g}); lower "
                      "--warmup-steps", UserWarning, stacklevel=2)
    task_options = {}
    if o.mask_prob != TrainOptions.mask_prob:
        if config["model_type"] != "bert":
            raise ValueError(f"mask_prob is a bert training option; this model is {config['model_type']!r}")
        task_options["train_mask_prob"] = o.mask_prob
    task = task_for(config, seq_len=o.seq_len, data_fraction=o.data_fraction, cache=cache, **task_options)
    task.device = device
    if o.seq_len_start:
        if config["model_type"] != "gpt":
            raise ValueError(f"seq_len_start (the curriculum) is a GPT training option; this model is "
                             f"{config['model_type']!r}")
        if o.seq_len_start >= task.seq_len:
            raise ValueError(f"seq_len_start ({o.seq_len_start}) must be below seq_len ({task.seq_len})")

    torch.manual_seed(o.seed)
    model = models.MODEL_CLASSES[config["model_type"]](config)
    if main:
        _check_output_dir(out, model)
    if resuming:
        model.load_state_dict(models.from_pretrained(os.path.realpath(last)).state_dict())
    model.to(device)
    if checkpoint_activations:
        model.gradient_checkpointing_enable()
    sharded = fsdp and world > 1
    if fsdp and world == 1:
        warnings.warn("pretrain: fsdp has no effect in a single process; run under torchrun "
                      "(e.g. torchrun --nproc_per_node=2 -m attnzoo pretrain ... --fsdp)", UserWarning, stacklevel=2)
    if sharded:
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    # Fused AdamW updates every parameter in one kernel rather than a loop of
    # small ops per tensor: 0.5 ms instead of 2.7 ms per step for vit-digits'
    # 72 tensors (1.7 vs 5.9 ms for gpt-kjv), 1.03x vit-digits' steps/s on
    # an idle 2-core machine. FSDP2's DTensor shards keep the loop (fused
    # AdamW over DTensors is not tested here).
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(0.9, 0.95),
                                  fused=not sharded)
    data_generator = torch.Generator().manual_seed(o.seed + 1)
    start, best, bad_evals, elapsed = 0, None, 0, 0.0
    if resuming:
        meta = _load_trainer_state(os.path.realpath(last), model, optimizer, data_generator, sharded)
        start, best, bad_evals, elapsed = meta["step"], meta["best"], meta["bad_evals"], meta["elapsed_s"]
        if main:
            _truncate_metrics(os.path.join(out, "metrics.jsonl"), start)
    elif main:
        write_text_atomic(os.path.join(out, "run.json"),
                          json.dumps({"model": config, "options": dataclasses.asdict(o)}, indent=1))
    # The model the steps compute with: a bfloat16 copy in a bfloat16 run
    # (the master weights stay in `model`), wrapped in DDP over processes.
    bf16_copy = _Bfloat16Copy(model, config, checkpoint_activations) if o.dtype == "bfloat16" and not sharded else None
    trained = bf16_copy.model if bf16_copy else model
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel
        trained = DistributedDataParallel(trained)

    metric, larger_is_better = HEADLINE[config["model_type"]]
    progress = _Progress(o.steps, start, main and not quiet, o.log_every)
    if main and not quiet:
        params = sum(p.numel() for p in model.parameters())
        progress.write(f"pretrain {config['model_type']} ({params / 1e6:.2f} M parameters, attention "
                       f"{_attention_kinds(config)}) -> {out}: steps {start}..{o.steps}, batch {o.batch_size}"
                       f"{f' x {o.grad_accum}' if o.grad_accum > 1 else ''} over {world} process(es)"
                       f"{' (FSDP2)' if sharded else ''}{_dtype_label(o.dtype, bf16_copy)}")
    if o.batch_size % o.grad_accum:
        raise ValueError(f"batch_size {o.batch_size} must be divisible by grad_accum {o.grad_accum}")
    metrics_path = os.path.join(out, "metrics.jsonl")
    final = {}
    step = start
    wall_start = time.perf_counter() - elapsed  # elapsed_s counts the resumed run's earlier time too
    t_last, units = time.perf_counter(), 0
    while step < o.steps:
        model.train()
        if bf16_copy:
            bf16_copy.model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, o)
        loss_sum = 0.0
        length, windows = curriculum(step, o, getattr(task, "seq_len", 0))
        micro = windows // o.grad_accum
        for m in range(o.grad_accum):
            if o.seq_len_start:  # GPT's curriculum (checked above)
                batch = task.batch(data_generator, micro, length)
            else:
                batch = task.batch(data_generator, micro)
            units += task.units_per_batch(batch)
            local = shard(batch, rank, world)
            sync = m == o.grad_accum - 1
            if sharded:
                model.set_requires_gradient_sync(sync)
            with (trained.no_sync() if world > 1 and not sharded and not sync else contextlib.nullcontext()):
                with compute_context(o.dtype, device.type):
                    loss = task.loss(trained, local) / o.grad_accum
                loss.backward()
            if bf16_copy and (world == 1 or sync):  # under DDP the copy accumulates until the synced backward
                bf16_copy.gradients_to_master()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"pretrain: the loss became {loss_sum} at step {step}; lower the learning rate")
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if bf16_copy:
            bf16_copy.weights_from_master()
        step += 1
        loss_sum = _mean_over_ranks(loss_sum, world, device)
        now = time.perf_counter()
        elapsed = now - wall_start
        if step % o.log_every == 0 or step == o.steps:
            rate = units / (now - t_last)
            t_last, units = now, 0
            record = {"step": step, "train_loss": loss_sum, "lr": lr_at(step - 1, o), "units_per_s": rate,
                      "elapsed_s": elapsed}
            if main:
                _append_jsonl(metrics_path, record)
        progress.update(step, f"loss {loss_sum:.4f} lr {lr_at(step - 1, o):.2e}")
        if step % o.eval_every == 0 or step == o.steps:
            model.eval()
            final = task.evaluate(model, "val", o.eval_batches)
            value = final[metric]
            improved = best is None or (value > best if larger_is_better else value < best)
            best, bad_evals = (value, 0) if improved else (best, bad_evals + 1)
            # gathered on every rank under FSDP2 (collectives), written by rank 0
            model_state = model._full_state()
            optimizer_state = _optimizer_state(model, optimizer, sharded)
            if main:
                _append_jsonl(metrics_path, {"step": step, **{f"val_{k}": v for k, v in final.items()}})
                progress.write(f"step {step}: val " + "  ".join(f"{k} {v:.4g}" for k, v in final.items()))
                _checkpoint(out, step, model, model_state, task, optimizer_state, data_generator, improved,
                            {"best": best, "bad_evals": bad_evals, "elapsed_s": elapsed})
                _plot(metrics_path, os.path.join(out, "loss.png"))
            if world > 1:
                dist.barrier()
            t_last, units = time.perf_counter(), 0  # throughput excludes evaluation and checkpointing
            if o.patience and bad_evals >= o.patience:
                progress.write(f"early stop at step {step}: no improvement in {o.patience} evaluations")
                break
    progress.close()
    if world > 1 and started_group:
        dist.destroy_process_group()
    return final


def _run_differences(run: dict, config: dict, o: TrainOptions) -> list:
    """What this command asks for that the run in the directory was not
    started with: model config keys and training options (steps excepted)."""
    differences = []
    started = run["model"]
    for key in sorted(set(started) | set(config)):
        if started.get(key) != config.get(key):
            differences.append(f"model {key} is {_shown(started.get(key))} there, "
                               f"{_shown(config.get(key))} here")
    asked = dataclasses.asdict(o)
    defaults = dataclasses.asdict(TrainOptions())  # runs from before an option existed used its default
    for key in sorted(asked):
        if key != "steps" and run["options"].get(key, defaults[key]) != asked[key]:
            differences.append(f"option {key} is {_shown(run['options'].get(key, defaults[key]))} there, "
                               f"{_shown(asked[key])} here")
    return differences


def _shown(value) -> str:
    return "unset" if value is None else json.dumps(value)


def _remove_run(out: str) -> None:
    """Removes what pretrain wrote into `out` (and nothing else)."""
    for name in ("last", "best"):
        if os.path.lexists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    for name in ("run.json", "metrics.jsonl", "loss.png"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def _mean_over_ranks(value, world, device):
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return t.item() / world


def _attention_kinds(config):
    attention = config["attention"]
    kinds = [a["kind"] for a in attention] if isinstance(attention, list) else [attention["kind"]]
    return "/".join(dict.fromkeys(kinds))


def _append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _truncate_metrics(path, step):
    """Drops records after the checkpoint being resumed (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            pass  # a line cut by the kill
    write_text_atomic(path, "".join(kept))


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checkpoint(out, step, model, model_state, task, optimizer_state, data_generator, is_best, extra):
    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f"{name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        model._write_pretrained(tmp, model_state)
        task.save_tokenizer(tmp)
        _save_trainer_state(tmp, step, optimizer_state, data_generator, extra)
        for entry in os.listdir(tmp):  # on disk before the rename makes the checkpoint visible
            _fsync(os.path.join(tmp, entry))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = os.path.realpath(os.path.join(out, "last")) if os.path.lexists(os.path.join(out, "last")) else None
        raise RuntimeError(f"pretrain: writing checkpoint {name} failed: {e}. "
                           + (f"The last complete checkpoint, {os.path.basename(previous)}, is intact; "
                              if previous else "No checkpoint was completed yet; ")
                           + "make room and run the same command to resume.") from None
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _fsync(root)
    _replace_link(os.path.join(out, "last"), os.path.join("checkpoints", name))
    if is_best:
        _replace_link(os.path.join(out, "best"), os.path.join("checkpoints", name))
    keep = {os.path.basename(os.path.realpath(os.path.join(out, link))) for link in ("last", "best")
            if os.path.lexists(os.path.join(out, link))}
    for entry in os.listdir(root):
        if entry not in keep:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _plot(metrics_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "train_loss" in r:
                train.append((r["step"], r["train_loss"]))
            if "val_loss" in r:
                val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".png")
    plt.close(fig)
