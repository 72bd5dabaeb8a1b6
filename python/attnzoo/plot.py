"""Attention heat maps of a checkpoint on one input.

    python -m attnzoo plot-attention models/gpt-kjv --text "In the beginning God"
    python -m attnzoo plot-attention models/vit-digits --index 3 --layers 0 3
    python -m attnzoo plot-attention runs/speech-digits-s2s --index 5   # cross-attention alignment

One PNG: a row per layer, a column per head, each cell the probabilities
(query rows, key columns) that layer's attention computed from its own input
in the model's forward pass. Text inputs are labelled with their tokens.

For a speech encoder-decoder the PNG is the alignment instead: the
cross-attention of one decoder layer (--layers, default the last), a panel
per head, rows the characters of the model's greedy transcript (each row the
query that predicts that character, the last the end token), columns the
encoder frames.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import data, models
from ._files import atomic_write
from .evaluate import resolve_checkpoint
from .tasks import task_for

__all__ = ["model_inputs", "plot_attention", "draw_attention", "plot_alignment", "draw_alignment"]

MAX_LABELLED = 48  # more tokens than this and the axis labels would overlap
LABEL_POINTS = 8


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


def plot_attention(path: str, out: str, text: Optional[str] = None, index: Optional[int] = None,
                   split: str = "test", layers: Optional[Sequence[int]] = None, cache=None) -> str:
    """Draws the attention maps of the checkpoint (or run) at `path` on one
    input into the PNG `out` (its directory is created when missing)."""
    checkpoint = resolve_checkpoint(path)
    model = models.from_pretrained(checkpoint)
    if text and index is not None:
        raise ValueError("plot-attention: --index picks a held-out example of an image or speech model; "
                         "with --text it has nothing to pick (give one of them)")
    inputs, labels = model_inputs(model, checkpoint, text, 0 if index is None else index, split, cache)
    if model.config["model_type"] == "speech_seq2seq":
        return plot_alignment(model, path, inputs[0], out, layers)
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
    title = f"{path}: attention (rows: queries, columns: keys)"
    skipped = [i for i in chosen if maps[i] is None]
    if skipped:
        title += f"; layers {skipped} not drawn (no probability matrix)"
    fig = draw_attention({layer: maps[layer][0] for layer in drawable}, labels, title)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return out


def plot_alignment(model, path: str, waveform: torch.Tensor, out: str, layers: Optional[Sequence[int]] = None) -> str:
    """The cross-attention alignment of a speech encoder-decoder on one
    utterance (1, samples): the model transcribes it greedily, then reads
    its own transcript again with teacher forcing, recording each decoder
    layer's cross-attention."""
    count = model.config["num_decoder_layers"]
    if layers is not None and len(layers) != 1:
        raise ValueError("plot-attention: a speech encoder-decoder draws one decoder layer's alignment; give one "
                         f"--layers value in [0, {count})")
    layer = count - 1 if not layers else layers[0]
    if not 0 <= layer < count:
        raise ValueError(f"plot-attention: layers must be in [0, {count}) (decoder layers), got {layer}")
    if model.config["cross_attention"]["kind"] != "dense":
        raise ValueError(f"plot-attention: {model.config['cross_attention']['kind']} cross-attention never forms "
                         "the probability matrix; nothing to draw")
    labels = data.SpeechLabels()
    heard = model.transcribe(waveform)[0]
    ids = torch.tensor([[model.config["bos_token_id"], *heard]])
    maps = model.cross_attention_maps(waveform, None, ids)
    rows = [labels.decode([i]) for i in heard] + ["<end>"]
    frame_ms = 4 * model.config["hop_length"] * 1000 / model.config["sample_rate"]  # two stride-2 convolutions
    title = (f"{path}: decoder layer {layer} cross-attention on {labels.decode(heard)!r} "
             "(rows: the character each query predicts; columns: encoder frames)")
    fig = draw_alignment(maps[layer][0], rows, frame_ms, title)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return out


def draw_alignment(probabilities: torch.Tensor, rows: Sequence[str], frame_ms: float, title: str):
    """One panel per head of (heads, characters, frames) probabilities, on one
    colour scale, characters labelled, frames in milliseconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, n, frames = probabilities.shape
    fig, axes = plt.subplots(1, heads, figsize=(3.2 * heads + 1.0, max(3.0, 0.16 * n + 1.2)), squeeze=False,
                             layout="constrained")
    top = float(probabilities.max())
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
    tick_labels = [r.replace(" ", "\u2423") for r in rows]
    for head in range(heads):
        ax = axes[0][head]
        image = ax.imshow(probabilities[head].float().numpy(), cmap="viridis", norm=norm, aspect="auto",
                          interpolation="nearest", extent=(0, frames * frame_ms, n - 0.5, -0.5))
        ax.set_title(f"head {head}", fontsize=9)
        ax.set_xlabel("time (ms)", fontsize=8)
        ax.set_yticks(range(n), tick_labels, fontsize=LABEL_POINTS if n <= MAX_LABELLED else 4)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    fig.suptitle(title, fontsize=10)
    return fig


def draw_attention(maps: dict, labels: Optional[Sequence[str]], title: str):
    """A figure with a row per layer and a column per head, every panel on one
    colour scale (0 to the largest probability drawn) with one colour bar, so
    panels compare at a glance. `maps`: layer -> (heads, queries, keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(maps)
    heads = next(iter(maps.values())).shape[0]
    n = next(iter(maps.values())).shape[-1]
    labelled = bool(labels) and n <= MAX_LABELLED
    # Panels grow with the number of labelled tokens so that the labels stay readable.
    panel = max(2.6, 0.16 * n) if labelled else 2.6
    fig, axes = plt.subplots(len(layers), heads, figsize=(panel * heads + 1.0, panel * len(layers) + 0.6),
                             squeeze=False, layout="constrained")
    top = max(float(m.max()) for m in maps.values())
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
    # Spaces shown as "␣" (a blank label reads as a missing one), other invisible characters escaped.
    tick_labels = [repr(t)[1:-1].replace(" ", "\u2423") for t in labels] if labelled else None
    rotation = 0 if labelled and max(len(t) for t in tick_labels) <= 2 else 60
    for row, layer in enumerate(layers):
        for head in range(heads):
            ax = axes[row][head]
            image = ax.imshow(maps[layer][head].float().numpy(), cmap="viridis", norm=norm, aspect="auto",
                              interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}", fontsize=9)
            if labelled:
                ax.set_xticks(range(n), tick_labels, rotation=rotation, fontsize=LABEL_POINTS,
                              ha="center" if rotation == 0 else "right")
                ax.set_yticks(range(n), tick_labels, fontsize=LABEL_POINTS)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    fig.suptitle(title, fontsize=10)
    return fig


def _layer_kind(config: dict, layer: int) -> str:
    attention = config["attention"]
    return (attention[layer] if isinstance(attention, list) else attention)["kind"]
