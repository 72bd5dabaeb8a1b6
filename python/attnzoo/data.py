"""Data that needs no download (DESIGN.md section 6), built once into a cache.

* ``kjv()``: the King James Bible from Debian's ``bible-kjv`` package, one
  verse per line, split by chapter (every 20th chapter validation, the next
  one test) so the splits are deterministic and spread over the whole book.
* ``digits()``: scikit-learn's bundled 8x8 digits, a fixed shuffled 70/15/15 split.
* Tokenisers: ``ByteTokenizer`` (256 byte values, for character-level models)
  and ``sentencepiece_tokenizer(vocab_size)`` (a unigram subword vocabulary
  trained on the training split, cached).

The cache is ``$ATTNZOO_DATA`` or ``~/.cache/attnzoo``; nothing is committed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from ._files import write_text_atomic

__all__ = ["cache_dir", "kjv", "digits", "ByteTokenizer", "SentencePieceTokenizer", "sentencepiece_tokenizer",
           "tokenizer_for"]

SPLITS = ("train", "val", "test")


def cache_dir() -> str:
    return os.environ.get("ATTNZOO_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "attnzoo")


def _progress(iterable, total=None, desc=""):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=None, file=sys.stderr, leave=False)


# ---------------------------------------------------------------------------
# KJV text

_VERSE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


def kjv(cache: Optional[str] = None) -> Dict[str, str]:
    """The KJV text per split: {"train": ..., "val": ..., "test": ...}, one
    verse per line (without its reference). Built on first use from the
    ``bible`` command of Debian's bible-kjv package."""
    root = os.path.join(cache or cache_dir(), "kjv")
    paths = {s: os.path.join(root, f"{s}.txt") for s in SPLITS}
    if not all(os.path.exists(p) for p in paths.values()):
        _build_kjv(root, paths)
    out = {}
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            out[split] = f.read()
    return out


def _build_kjv(root: str, paths: Dict[str, str]) -> None:
    if shutil.which("bible") is None:
        raise RuntimeError("attnzoo.data.kjv needs the `bible` command: install Debian's bible-kjv "
                           "package (tools/setup.sh does)")
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    lines = text.splitlines()
    chapters: List[List[str]] = []
    last = None
    for line in _progress(lines, total=len(lines), desc="kjv: splitting"):
        m = _VERSE.match(line)
        if not m:
            continue
        book, chapter, _, verse = m.groups()
        if (book, chapter) != last:
            chapters.append([])
            last = (book, chapter)
        chapters[-1].append(verse.strip())
    if len(chapters) != 1189:
        raise RuntimeError(f"attnzoo.data.kjv: expected 1189 chapters from `bible`, got {len(chapters)}")
    parts = {s: [] for s in SPLITS}
    for i, verses in enumerate(chapters):
        split = "val" if i % 20 == 0 else "test" if i % 20 == 1 else "train"
        parts[split].extend(verses)
    os.makedirs(root, exist_ok=True)
    for split, verses in parts.items():
        write_text_atomic(paths[split], "\n".join(verses) + "\n")


# ---------------------------------------------------------------------------
# Digits

def digits(cache: Optional[str] = None) -> Dict[str, tuple]:
    """sklearn's 8x8 digits per split: {"train": (images (N, 1, 8, 8) float32 in
    [0, 1], labels (N,) int64), "val": ..., "test": ...}; a fixed permutation
    (seed 0) gives 70/15/15."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train, n_val = int(0.7 * len(order)), int(0.15 * len(order))
    bounds = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {s: (images[idx], labels[idx]) for s, idx in bounds.items()}


# ---------------------------------------------------------------------------
# Tokenisers

class ByteTokenizer:
    """UTF-8 bytes: 256 ids, nothing to train (character level for ASCII text)."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        write_text_atomic(os.path.join(directory, "tokenizer.json"), json.dumps({"kind": "bytes"}))


class SentencePieceTokenizer:
    """A sentencepiece unigram model with [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""

    kind = "sentencepiece"
    pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        shutil.copyfile(self.model_path, os.path.join(directory, "tokenizer.model"))
        write_text_atomic(os.path.join(directory, "tokenizer.json"), json.dumps({"kind": "sentencepiece"}))


def sentencepiece_tokenizer(vocab_size: int, cache: Optional[str] = None) -> SentencePieceTokenizer:
    """A unigram vocabulary of vocab_size pieces trained on the KJV training split (cached)."""
    import sentencepiece as spm

    root = os.path.join(cache or cache_dir(), "kjv")
    model = os.path.join(root, f"sp{vocab_size}.model")
    if not os.path.exists(model):
        text = kjv(cache)["train"]
        prefix = os.path.join(root, f"sp{vocab_size}.tmp{os.getpid()}")
        print(f"attnzoo.data: training a {vocab_size}-piece sentencepiece vocabulary on the KJV ...",
              file=sys.stderr, flush=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text.splitlines()), model_prefix=prefix, vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
            user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"], num_threads=2, minloglevel=2)
        os.replace(prefix + ".model", model)
        os.remove(prefix + ".vocab")
    return SentencePieceTokenizer(model)


def tokenizer_for(directory: str):
    """The tokenizer saved beside a checkpoint (bytes when none was saved)."""
    spec = os.path.join(directory, "tokenizer.json")
    if os.path.exists(spec):
        with open(spec) as f:
            kind = json.load(f)["kind"]
        if kind == "sentencepiece":
            return SentencePieceTokenizer(os.path.join(directory, "tokenizer.model"))
    return ByteTokenizer()
