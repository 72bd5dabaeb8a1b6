"""Attention heat maps of a checkpoint on one input.

    python -m attnzoo plot-attention models/gpt-kjv --text "In the beginning God"
    python -m attnzoo plot-attention models/vit-digits --index 3 --layers 0 3

One PNG: a row per layer, a column per head, each cell the probabilities
(query rows, key columns) that layer's attention computed from its own input
in the model's forward pass. Text inputs are labelled with their tokens.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import data, models
from ._files import atomic_write
from .evaluate import resolve_checkpoint
from .tasks import task_for

__all__ = ["model_inputs", "plot_attention"]

MAX_LABELLED = 48  # more tokens than this and the axis labels would overlap


def model_inputs(model, checkpoint: str, text: Optional[str], index: int, split: str, cache=None):
    """(forward args, axis labels) for one input: text for GPT/BERT, a held-out
    image or utterance (by index) for ViT and speech."""
    kind = model.config["model_type"]
    if kind in ("gpt", "bert"):
        if not text:
            raise ValueError(f"plot-attention: a {kind} model needs --text")
        tokenizer = data.tokenizer_for(checkpoint)
        ids = tokenizer.encode(text)
        if kind == "bert":
            ids = [data.SentencePieceTokenizer.cls_id] + ids if tokenizer.kind == "sentencepiece" else ids
        limit = model.config["max_position_embeddings"]
        if not ids or len(ids) > limit:
            raise ValueError(f"plot-attention: the text is {len(ids)} tokens; the model takes 1..{limit}")
        special = {} if tokenizer.kind == "bytes" else {0: "[PAD]", 1: "[UNK]", 2: "[CLS]", 3: "[SEP]", 4: "[MASK]"}
        labels = [special.get(i) or tokenizer.decode([i]) for i in ids]
        return (torch.tensor([ids]),), labels
    if text:
        raise ValueError(f"plot-attention: a {kind} model takes --index (a {split} example), not --text")
    task = task_for(model.config, cache=cache)
    if kind == "vit":
        images, labels = task.splits[split]
        if not 0 <= index < len(labels):
            raise ValueError(f"plot-attention: --index must be in [0, {len(labels)}), got {index}")
        return (images[index:index + 1],), None
    audio, texts = task.splits[split]
    if not 0 <= index < len(audio):
        raise ValueError(f"plot-attention: --index must be in [0, {len(audio)}), got {index}")
    return (audio[index].float().unsqueeze(0) / 32768.0,), None


def plot_attention(path: str, out: str, text: Optional[str] = None, index: int = 0, split: str = "test",
                   layers: Optional[Sequence[int]] = None, cache=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoint = resolve_checkpoint(path)
    model = models.from_pretrained(checkpoint).eval()
    inputs, labels = model_inputs(model, checkpoint, text, index, split, cache)
    maps = model.attention_maps(*inputs)
    chosen = list(range(len(maps))) if not layers else list(layers)
    for layer in chosen:
        if not 0 <= layer < len(maps):
            raise ValueError(f"plot-attention: layers must be in [0, {len(maps)}), got {layer}")
    drawable = [i for i in chosen if maps[i] is not None]
    if not drawable:
        kinds = {_layer_kind(model.config, i) for i in chosen}
        raise ValueError(f"plot-attention: attention kind(s) {', '.join(sorted(kinds))} never form the probability "
                         "matrix; nothing to draw")
    heads = maps[drawable[0]].shape[1]
    fig, axes = plt.subplots(len(drawable), heads, figsize=(2.6 * heads, 2.6 * len(drawable)), squeeze=False)
    for row, layer in enumerate(drawable):
        probs = maps[layer][0]
        for head in range(heads):
            ax = axes[row][head]
            ax.imshow(probs[head].float().numpy(), cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            n = probs.shape[-1]
            if labels and n <= MAX_LABELLED:
                ax.set_xticks(range(n), [repr(t)[1:-1] for t in labels], rotation=90, fontsize=5)
                ax.set_yticks(range(n), [repr(t)[1:-1] for t in labels], fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    skipped = [i for i in chosen if maps[i] is None]
    title = f"{path}: attention (rows: queries, columns: keys)"
    if skipped:
        title += f"; layers {skipped} not drawn (no probability matrix)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    plt.close(fig)
    return out


def _layer_kind(config: dict, layer: int) -> str:
    attention = config["attention"]
    return (attention[layer] if isinstance(attention, list) else attention)["kind"]
