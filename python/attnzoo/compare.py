"""Attention kinds side by side: the same model, data order, seed and number
of steps, only the attention kind differs.

    python -m attnzoo compare models/gpt-kjv --out runs/compare --steps 400 \\
        --kinds dense t5 alibi rotary local block_sparse linformer lsh

Each kind is one pretrain run (runs/compare/<kind>/); the table reports the
validation loss over the whole validation split at the last step and the
training throughput (median of the logged rates, evaluation excluded).
Writes compare.json and compare.md in the output directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import List, Optional

from .train import TrainOptions, pretrain, recommended_options

__all__ = ["compare"]

DEFAULT_KINDS = ["dense", "t5", "alibi", "rotary", "local", "block_sparse", "linformer", "lsh"]


def compare(model_source, out: str, kinds: Optional[List[str]] = None, options: Optional[TrainOptions] = None,
            model_overrides: Optional[dict] = None, quiet: bool = False) -> List[dict]:
    kinds = kinds or DEFAULT_KINDS
    o = options or recommended_options(model_source)
    # Evaluate only at the end, over the whole split: the number that is compared.
    o = dataclasses.replace(o, eval_every=o.steps, eval_batches=0, patience=0)
    rows = []
    for kind in kinds:
        run = os.path.join(out, kind)
        final = pretrain(model_source, run, o, attention=kind, model_overrides=model_overrides, quiet=quiet)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        rates = [r["units_per_s"] for r in records if "units_per_s" in r][1:]  # the first includes start-up
        rows.append({"kind": kind, "val_loss": final["loss"], "val_perplexity": final["perplexity"],
                     "tokens_per_s": statistics.median(rates) if rates else float("nan"),
                     "train_loss_last": [r["train_loss"] for r in records if "train_loss" in r][-1]})
        if not quiet:
            print(f"{kind}: val loss {final['loss']:.4f}  {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    lines = ["| attention | validation loss (nats/char) | perplexity | training tokens/s |"
             + (" speed vs dense |" if dense else ""),
             "|---|---|---|---|" + ("---|" if dense else "")]
    for r in rows:
        line = f"| {r['kind']} | {r['val_loss']:.4f} | {r['val_perplexity']:.3f} | {r['tokens_per_s']:.0f} |"
        if dense:
            line += f" {r['tokens_per_s'] / dense['tokens_per_s']:.2f}x |"
        lines.append(line)
    table = "\n".join(lines)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"model": os.fspath(model_source), "overrides": model_overrides or {},
                   "options": dataclasses.asdict(o), "rows": rows}, f, indent=1)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(table + "\n")
    if not quiet:
        print(table)
    return rows
