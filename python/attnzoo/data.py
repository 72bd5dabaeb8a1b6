"""Data that needs no download (docs/design.md, section 7), built once into a cache.

* ``kjv()``: the King James Bible from Debian's ``bible-kjv`` package, one
  verse per line, split by chapter (every 20th chapter validation, the next
  one test) so the splits are deterministic and spread over the whole book.
* ``digits()``: scikit-learn's bundled 8x8 digits, a fixed shuffled 70/15/15 split.
* ``spoken_digits()``: digit strings ("three one four") synthesised with
  espeak-ng in many accents, voice variants, speeds and pitches, speed-perturbed
  and resampled to 16 kHz with sox; validation and test use voice variants
  that training never hears. Noise is added by the speech task (fresh noise
  per training batch, fixed seeded noise in evaluation). Every choice (text,
  voice, rate, pitch, speed) is seeded; the samples are espeak-ng's, and a
  noise-excited voice (whisper) has rarely come out with a different noise
  draw in a second build, so the set is built once and read from the cache.
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

from ._files import atomic_write, write_text_atomic

__all__ = ["cache_dir", "kjv", "digits", "spoken_digits", "SpeechLabels", "ByteTokenizer", "SentencePieceTokenizer",
           "sentencepiece_tokenizer", "tokenizer_for"]

SPLITS = ("train", "val", "test")


def cache_dir() -> str:
    return os.environ.get("ATTNZOO_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "attnzoo")


def _progress(iterable, total=None, desc=""):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=None, file=sys.stderr, leave=False)


def _split_files(cache: Optional[str], name: str, extension: str, build) -> Dict[str, str]:
    """The per-split files of a data set in the cache; build(root, paths) makes
    them when any is missing (each builder writes them atomically)."""
    root = os.path.join(cache or cache_dir(), name)
    paths = {s: os.path.join(root, s + extension) for s in SPLITS}
    if not all(os.path.exists(p) for p in paths.values()):
        build(root, paths)
    return paths


# ---------------------------------------------------------------------------
# KJV text

_VERSE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


def kjv(cache: Optional[str] = None) -> Dict[str, str]:
    """The KJV text per split: {"train": ..., "val": ..., "test": ...}, one
    verse per line (without its reference). Built on first use from the
    ``bible`` command of Debian's bible-kjv package."""
    paths = _split_files(cache, "kjv", ".txt", _build_kjv)
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
# Spoken digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEECH_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029",
                  "en-us-nyc")
# espeak-ng voice variants (timbre, formants, breathiness). Validation and test
# variants are held out: a model is scored on voices it never trained on.
SPEECH_VARIANTS = {
    "train": ("m1", "m2", "m3", "m4", "m5", "m8", "f1", "f2", "f3", "klatt", "klatt2", "klatt5", "klatt6", "adam",
              "Alex", "Andy", "Annie", "aunty", "caleb", "david", "ed", "edward", "Gene", "iven", "iven3", "john",
              "linda", "max", "Michael", "paul", "pedro", "quincy", "rob", "robert", "steph", "steph3", "travis",
              "victor", "zac", "anika", "grandma", "norbert", "shelby", "whisper", "croak"),
    "val": ("m7", "f5", "klatt4", "benjamin"),
    "test": ("m6", "f4", "klatt3", "steph2", "iven2", "grandpa"),
}
SPEECH_UTTERANCES = {"train": 6000, "val": 400, "test": 600}
SPEECH_SAMPLE_RATE = 16000


class SpeechLabels:
    """CTC labels of the digit words: 0 blank, 1 space, 2.. the 15 letters."""

    blank_id = 0
    symbols = " " + "".join(sorted(set("".join(DIGIT_WORDS))))
    vocab_size = 1 + len(symbols)

    def encode(self, text: str) -> List[int]:
        try:
            return [1 + self.symbols.index(c) for c in text]
        except ValueError:
            raise ValueError(f"SpeechLabels: {text!r} has a character outside {self.symbols!r}") from None

    def decode(self, ids) -> str:
        return "".join(self.symbols[int(i) - 1] for i in ids if 0 < int(i) <= len(self.symbols))

    def save(self, directory: str) -> None:
        """tokenizer.json: {"kind": "labels", "labels": [...]}, the text of each
        label id ("" for the blank), for readers without Python (attnzoo-cli
        transcribe)."""
        labels = [""] + list(self.symbols)
        write_text_atomic(os.path.join(directory, "tokenizer.json"), json.dumps({"kind": "labels", "labels": labels}))


def spoken_digits(cache: Optional[str] = None) -> Dict[str, dict]:
    """The spoken-digits set per split: {"train": {"audio": [int16 tensors at
    16 kHz], "text": ["three one four", ...], "voice": [...]}, ...}. Built on
    first use with espeak-ng and sox (about a minute on two cores)."""
    from ._files import load_safetensors

    paths = _split_files(cache, "spoken-digits", ".safetensors", _build_spoken_digits)
    out = {}
    for split, path in paths.items():
        tensors = load_safetensors(path)
        with open(path[: -len(".safetensors")] + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        bounds = tensors["offsets"].tolist()
        audio = [tensors["audio"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        out[split] = {"audio": audio, "text": meta["text"], "voice": meta["voice"]}
    return out


def _synthesise(job) -> bytes:
    """One utterance as 16-kHz int16 samples: espeak-ng -> sox (speed, rate, level)."""
    text, voice, wpm, pitch, speed = job
    speak = subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch), "--stdout", text],
                           capture_output=True, check=True)
    shaped = subprocess.run(["sox", "-R", "-t", "wav", "-", "-t", "s16", "-r", str(SPEECH_SAMPLE_RATE), "-c", "1",
                             "-", "speed", f"{speed:.3f}", "norm", "-3"],
                            input=speak.stdout, capture_output=True, check=True)
    return shaped.stdout


def _build_spoken_digits(root: str, paths: Dict[str, str]) -> None:
    import random
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    for tool, package in (("espeak-ng", "espeak-ng"), ("sox", "sox")):
        if shutil.which(tool) is None:
            raise RuntimeError(f"attnzoo.data.spoken_digits needs `{tool}`: install Debian's {package} package "
                               "(tools/setup.sh does)")
    os.makedirs(root, exist_ok=True)
    for split_index, split in enumerate(SPLITS):
        rng = random.Random(1000 + split_index)
        jobs = []
        for _ in range(SPEECH_UTTERANCES[split]):
            text = " ".join(rng.choice(DIGIT_WORDS) for _ in range(rng.randint(1, 5)))
            voice = f"{rng.choice(SPEECH_ACCENTS)}+{rng.choice(SPEECH_VARIANTS[split])}"
            jobs.append((text, voice, rng.randint(120, 240), rng.randint(20, 80), rng.uniform(0.9, 1.1)))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            clips = list(_progress(pool.map(_synthesise, jobs), total=len(jobs), desc=f"spoken digits: {split}"))
        empty = [job[1] for job, clip in zip(jobs, clips) if len(clip) < 2 * SPEECH_SAMPLE_RATE // 10]
        if empty:
            raise RuntimeError(f"attnzoo.data.spoken_digits: espeak-ng produced no audio for voice(s) "
                               f"{', '.join(sorted(set(empty)))}")
        audio = [torch.frombuffer(bytearray(clip), dtype=torch.int16) for clip in clips]
        offsets = torch.tensor([0] + [len(a) for a in audio]).cumsum(0)
        meta = {"sample_rate": SPEECH_SAMPLE_RATE, "text": [j[0] for j in jobs], "voice": [j[1] for j in jobs],
                "wpm": [j[2] for j in jobs], "pitch": [j[3] for j in jobs], "speed": [round(j[4], 3) for j in jobs]}
        write_text_atomic(paths[split][: -len(".safetensors")] + ".json", json.dumps(meta))
        # The tensors file is written last: its presence marks a complete split.
        atomic_write(paths[split], lambda tmp: save_file({"audio": torch.cat(audio), "offsets": offsets}, tmp))


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
