"""Held-out evaluation of a run or a checkpoint directory.

    python -m attnzoo evaluate runs/gpt-kjv            # the run's best checkpoint, test split
    python -m attnzoo evaluate models/vit-digits --split val

Prints a table and writes the metrics as JSON: eval-<split>.json in a run
directory, or the file given by --out. Nothing is written into a checkpoint
directory (a committed model stays as it is): without --out its metrics are
only printed. GPT runs also print a generated sample, speech runs a few
transcripts.

    python -m attnzoo evaluate runs/gpt-kjv-lsh --context-use   # also: does it use its context?

--context-use (GPT) adds the loss on the last `short` targets of each
window with the whole window before them and with only the `short`
characters before each (tasks.GPTTask.context_use; short defaults to
min(256, seq_len / 4)), their difference with its standard error, and
context-use.png: the full-context loss by position. The PNG goes where the
JSON goes. It also runs a copy probe (tasks.GPTTask.copy_probe): runs of
`short` characters of shuffled words, repeated seq_len - short characters
later; the loss on the second copy against the first says whether the
model can look back that far at all.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from . import data, models
from ._files import atomic_write, write_text_atomic
from .tasks import task_for

__all__ = ["evaluate", "resolve_checkpoint", "export", "cli_agreement"]


def resolve_checkpoint(path: str) -> str:
    """A run directory's best (else last) checkpoint, or the directory itself."""
    for link in ("best", "last"):
        candidate = os.path.join(path, link)
        if os.path.exists(os.path.join(candidate, "config.json")):
            return os.path.realpath(candidate)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    raise FileNotFoundError(f"{path!r} holds neither a run (best/ or last/) nor a checkpoint "
                            "(config.json + model.safetensors)")


def evaluate(path: str, split: str = "test", out: Optional[str] = None, max_batches: int = 0,
             sample_tokens: int = 200, cache: Optional[str] = None, quiet: bool = False,
             context_use: bool = False, context_short: Optional[int] = None, context_windows: int = 32,
             beam_size: int = 4, ctc_weight: float = 0.3, cli: Optional[str] = None) -> dict:
    if split not in data.SPLITS:
        raise ValueError(f"split must be one of {', '.join(data.SPLITS)}, got {split!r}")
    checkpoint = resolve_checkpoint(path)
    model = models.from_pretrained(checkpoint).eval()
    config = model.config
    options = {}
    run_json = os.path.join(path, "run.json")
    if os.path.exists(run_json):
        with open(run_json) as f:
            options = json.load(f)["options"]
    tokenizer = data.tokenizer_for(checkpoint) if config["model_type"] in ("gpt", "bert") else None
    task = task_for(config, seq_len=options.get("seq_len", 0), data_fraction=options.get("data_fraction", 1.0),
                    cache=cache, tokenizer=tokenizer)
    start = time.perf_counter()
    if config["model_type"] == "speech_seq2seq":  # greedy and beam search
        metrics = task.evaluate(model, split, max_batches, beam_size=beam_size, ctc_weight=ctc_weight)
    else:
        metrics = task.evaluate(model, split, max_batches)
    result = {"checkpoint": checkpoint, "model_type": config["model_type"], "split": split, **metrics,
              "seconds": time.perf_counter() - start}
    if config["model_type"] == "gpt" and sample_tokens > 0:
        prompt = torch.tensor([tokenizer.encode("And God said")])
        tokens = model.generate(prompt, sample_tokens, temperature=0.8, top_k=40, seed=0)
        result["sample"] = tokenizer.decode(tokens[0].tolist())
        result["sample_title"] = "sample (temperature 0.8, top-k 40):"
    if config["model_type"] in ("speech", "speech_seq2seq") and sample_tokens > 0:
        shown = list(range(min(4, len(task.splits[split][1]))))
        heard = task.transcribe(model, split, shown, torch.Generator().manual_seed(1234))[-1]
        if config["model_type"] == "speech_seq2seq":
            heard = heard[0]  # the transcripts of the first (greedy) search
        result["sample"] = "\n".join(f"{task.splits[split][1][i]!r} -> {h!r}" for i, h in zip(shown, heard))
        decoder = "greedy CTC" if config["model_type"] == "speech" else "greedy decoder"
        result["sample_title"] = f"transcripts (reference -> {decoder}):"
    if cli is not None:
        if config["model_type"] != "speech_seq2seq":
            raise ValueError(f"--cli compares attnzoo-cli transcribe with Python: speech_seq2seq models, not "
                             f"{config['model_type']}")
        searches = [(1, 0.0)] + ([(beam_size, ctc_weight)] if beam_size > 1 else [])
        result["cli_agreement"] = [cli_agreement(checkpoint, model, task, split, cli, k, w) for k, w in searches]
    if out is None and os.path.exists(run_json):
        out = os.path.join(path, f"eval-{split}.json")
    if context_use:
        if config["model_type"] != "gpt":
            raise ValueError(f"--context-use measures GPT models, not {config['model_type']}")
        short = context_short or min(256, task.seq_len // 4)
        measured = task.context_use(model, split, short, context_windows)
        by_position = measured.pop("loss_by_position")
        result["context_use"] = measured
        result["copy_probe"] = task.copy_probe(model, split, min(short, task.seq_len // 2), context_windows)
        if out is not None:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            png = os.path.join(os.path.dirname(os.path.abspath(out)), "context-use.png")
            _plot_context_use(png, by_position, measured)
            result["context_use"]["plot"] = png
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=1))
    if not quiet:
        print(format_table(result))
        print(f"wrote {out}" if out else "(a checkpoint, not a run: nothing written; --out FILE saves the metrics)")
    return result


def cli_agreement(checkpoint: str, model, task, split: str, cli: str, beam_size: int = 1, ctc_weight: float = 0.0,
                  limit: int = 0) -> dict:
    """Transcribes the split's utterances (clean, as 16-bit WAV files) with
    `attnzoo-cli transcribe` and with the Python model, one utterance at a
    time in both, and counts the identical transcripts."""
    import subprocess
    import tempfile
    import wave

    audio = task.splits[split][0]
    count = min(limit, len(audio)) if limit else len(audio)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(count):
            files.append(os.path.join(tmp, f"{i:05d}.wav"))
            with wave.open(files[-1], "wb") as f:
                f.setnchannels(1)
                f.setsampwidth(2)
                f.setframerate(model.config["sample_rate"])
                f.writeframes(audio[i].to(torch.int16).numpy().tobytes())
        report = os.path.join(tmp, "cli.json")
        start = time.perf_counter()
        done = subprocess.run([cli, "transcribe", checkpoint, *files, "--beam-size", str(beam_size), "--ctc-weight",
                               repr(ctc_weight), "--json", report], capture_output=True, text=True)
        cli_seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{cli} transcribe failed: {done.stderr.strip()}")
        with open(report, encoding="utf-8") as f:
            from_cli = [r["ids"] for r in json.load(f)]
    start = time.perf_counter()
    from_python = [model.transcribe(audio[i].float().unsqueeze(0) / 32768.0, beam_size=beam_size,
                                    ctc_weight=ctc_weight)[0] for i in range(count)]
    return {"beam_size": beam_size, "ctc_weight": ctc_weight, "utterances": count,
            "identical": sum(a == b for a, b in zip(from_cli, from_python)),
            "cli_seconds": cli_seconds, "python_seconds": time.perf_counter() - start}


def _plot_context_use(path: str, by_position, measured: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, short = measured["seq_len"], measured["short"]
    width = max(1, L // 64)  # mean over bins of positions: the curve, not the noise
    loss = torch.tensor(by_position)[: L // width * width].view(-1, width).mean(1)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(torch.arange(len(loss)) * width + width / 2, loss, label="full context, by position")
    ax.axvspan(L - short, L, color="0.9")
    for key, style, label in (("loss_full_context", "-", "full context"), ("loss_short_context", "--",
                                                                            f"previous {short} only")):
        ax.hlines(measured[key], L - short, L, colors="C1" if style == "--" else "C2", linestyles=style,
                  label=f"targets {L - short}-{L - 1}, {label}: {measured[key]:.4f}")
    ax.set_xlabel("target position")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(f"context use: difference {measured['difference']:.4f} ± {measured['standard_error']:.4f} "
                 f"(SE, {measured['windows']} windows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".png")
    plt.close(fig)


def format_table(result: dict) -> str:
    rows = [(k, v) for k, v in result.items()
            if k not in ("checkpoint", "sample", "sample_title", "context_use", "copy_probe", "cli_agreement")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':{width}s}  value", f"{'-' * width}  -----"]
    for k, v in rows:
        lines.append(f"{k:{width}s}  {v:.4f}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    if "context_use" in result:
        c = result["context_use"]
        lines += ["", f"context use ({c['targets']}, {c['windows']} windows): loss {c['loss_full_context']:.4f} "
                      f"with the whole window, {c['loss_short_context']:.4f} with the previous {c['short']} "
                      f"only; difference {c['difference']:.4f} +- {c['standard_error']:.4f} (SE): "
                      f"{'uses' if c['uses_context'] else 'no evidence that it uses'} the longer context"]
    if "copy_probe" in result:
        c = result["copy_probe"]
        lines.append(f"copy probe ({c['windows']} runs of {c['run']} shuffled-word characters, repeated "
                     f"{c['distance']} later): loss {c['loss_first_copy']:.4f} on the first copy, "
                     f"{c['loss_second_copy']:.4f} on the second; difference {c['difference']:.4f} +- "
                     f"{c['standard_error']:.4f} (SE): {'copies' if c['copies'] else 'no evidence that it copies'} "
                     f"from that far back")
    for c in result.get("cli_agreement", []):
        lines.append(f"attnzoo-cli transcribe, beam {c['beam_size']}, CTC weight {c['ctc_weight']}: "
                     f"{c['identical']} of {c['utterances']} transcripts identical to Python's "
                     f"({c['cli_seconds']:.1f} s; Python {c['python_seconds']:.1f} s)")
    if "sample" in result:
        lines += ["", result["sample_title"], result["sample"]]
    return "\n".join(lines)


def export(path: str, destination: str, dtype: str = "float32") -> str:
    """Copies a run's best checkpoint (or a checkpoint) to `destination` with
    its weights in `dtype` (bfloat16 halves the size; a model loads them into
    its own float32 parameters), without the trainer state."""
    import shutil

    from safetensors.torch import save_file

    from ._files import load_safetensors

    types = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in types:
        raise ValueError(f"dtype must be one of {', '.join(types)}, got {dtype!r}")
    checkpoint = resolve_checkpoint(path)
    os.makedirs(destination, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer.model"):
        if os.path.exists(os.path.join(checkpoint, name)):
            shutil.copyfile(os.path.join(checkpoint, name), os.path.join(destination, name))
    tensors = {k: v.to(types[dtype]) if v.is_floating_point() else v
               for k, v in load_safetensors(os.path.join(checkpoint, "model.safetensors")).items()}
    metadata = {"format": "pt", "producer": "attnzoo", "source": checkpoint}
    atomic_write(os.path.join(destination, "model.safetensors"), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return destination
