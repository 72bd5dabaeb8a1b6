"""What each model kind learns from the embedded data: batches, the loss and
the held-out metrics. Used by attnzoo.train (pretrain) and evaluate.

* gpt: next-byte prediction on the KJV text (loss in nats per character).
* bert: masked-token prediction on the KJV in a subword vocabulary
  (15% of the tokens: 80% [MASK], 10% a random token, 10% unchanged).
* vit: the 8x8 digits, with random shifts of up to one pixel in training.
* speech: CTC on spoken digit strings (espeak-ng voices; validation and test
  voices held out), white noise at 10-30 dB SNR added to every utterance
  (fresh per training batch, seeded in evaluation); CER and WER.
* speech_seq2seq: the same utterances; the decoder's cross-entropy with
  teacher forcing plus a CTC loss on the encoder (weight ctc_weight = 0.3);
  CER and WER of greedy transcripts (and of beam search where asked, by the
  decoder alone and jointly with the CTC head).

Batches are drawn from a torch.Generator the trainer owns (so a resumed run
draws exactly what the uninterrupted one would have); evaluation is
deterministic.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from . import data


class Task:
    model_type = ""

    def __init__(self, config: dict, data_fraction: float = 1.0):
        self.config = config
        self.data_fraction = data_fraction
        self.device = torch.device("cpu")  # where batches go (the model's device); the data stay on the CPU

    def _on_device(self, *tensors):
        return tuple(t.to(self.device) for t in tensors)

    def _slice(self, n: int) -> int:
        return max(1, int(n * self.data_fraction))

    def batch(self, generator: torch.Generator, batch_size: int):
        raise NotImplementedError

    def loss(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model, split: str, max_batches: int = 0, batch_size: int = 32) -> Dict[str, float]:
        raise NotImplementedError

    def units_per_batch(self, batch) -> int:
        """Tokens (or images) in a batch, for throughput."""
        return int(batch[0].numel()) if batch[0].dim() == 2 else int(batch[0].shape[0])

    def save_tokenizer(self, directory: str) -> None:
        pass


def shard(batch, rank: int, world: int):
    """This rank's share of a global batch (the batch dimension split evenly)."""
    return tuple(t.chunk(world)[rank] for t in batch)


class TextTask(Task):
    """A token stream per split and windows of seq_len over it."""

    def __init__(self, config, seq_len=0, data_fraction=1.0, cache=None, tokenizer=None):
        super().__init__(config, data_fraction)
        self.seq_len = seq_len or min(config["max_position_embeddings"], 256)
        if self.seq_len > config["max_position_embeddings"]:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_position_embeddings "
                             f"{config['max_position_embeddings']}")
        self.tokenizer = tokenizer or self.make_tokenizer(config, cache)
        if self.tokenizer.vocab_size > config["vocab_size"]:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{config['vocab_size']}")
        text = data.kjv(cache)
        self.streams = {}
        for split, t in text.items():
            t = t[: self._slice(len(t))]
            self.streams[split] = torch.tensor(self.tokenizer.encode(t), dtype=torch.long)
            if len(self.streams[split]) < self.seq_len + 2:
                raise ValueError(f"the {split} split has {len(self.streams[split])} tokens, fewer than a window "
                                 f"of {self.seq_len}; raise data_fraction")

    def save_tokenizer(self, directory):
        self.tokenizer.save(directory)

    def windows(self, split: str, starts: torch.Tensor, length: int) -> torch.Tensor:
        stream = self.streams[split]
        return torch.stack([stream[s:s + length] for s in starts.tolist()])

    def eval_starts(self, split: str, length: int, max_batches: int, batch_size: int) -> torch.Tensor:
        # Non-overlapping windows over the whole split, or evenly spaced ones
        # when max_batches limits their number.
        n = len(self.streams[split]) - length
        starts = torch.arange(0, n, length)
        if max_batches and len(starts) > max_batches * batch_size:
            starts = torch.linspace(0, n - 1, max_batches * batch_size).long()
        return starts


class GPTTask(TextTask):
    model_type = "gpt"

    @staticmethod
    def make_tokenizer(config, cache):
        return data.ByteTokenizer()

    def batch(self, generator, batch_size, length=None):
        """batch_size training windows of `length` (default seq_len) characters, and their next ones."""
        length = length or self.seq_len
        stream = self.streams["train"]
        starts = torch.randint(0, len(stream) - length - 1, (batch_size,), generator=generator)
        return self._on_device(self.windows("train", starts, length + 1))

    def loss(self, model, batch):
        x = batch[0]
        logits = model(x[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    def units_per_batch(self, batch):
        return int(batch[0][:, 1:].numel())

    @torch.no_grad()
    def evaluate(self, model, split, max_batches=0, batch_size=32):
        starts = self.eval_starts(split, self.seq_len + 1, max_batches, batch_size)
        total, count = 0.0, 0
        for chunk in starts.split(batch_size):
            (x,) = self._on_device(self.windows(split, chunk, self.seq_len + 1))
            logits = model(x[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            count += x[:, 1:].numel()
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": loss / math.log(2), "tokens": count}

    @torch.no_grad()
    def context_use(self, model, split: str, short: int, windows: int = 32) -> Dict:
        """Does the model use context beyond `short` characters? Over `windows`
        evenly spaced windows of seq_len + 1 characters, the loss on the last
        `short` targets (positions seq_len - short .. seq_len - 1) seeing the
        whole window before them, and seeing only the `short` characters
        before each (one input of `short` characters per target, its last
        logit scored). The difference's standard error is over windows (the
        targets of one window are not independent). Also the full-context
        loss at every position, averaged over the windows."""
        L = self.seq_len
        if not 0 < short < L:
            raise ValueError(f"context_use: short must lie in (0, seq_len = {L}), got {short}")
        starts = torch.linspace(0, len(self.streams[split]) - L - 2, windows).long()
        tail = torch.arange(L - short, L)  # target t is x[t + 1], predicted from x[.. t]
        by_position, full_tail, short_tail = torch.zeros(L), [], []
        for start in starts.tolist():
            (x,) = self._on_device(self.windows(split, torch.tensor([start]), L + 1))
            full = F.cross_entropy(model(x[:, :L])[0].float(), x[0, 1:], reduction="none").cpu()
            by_position += full
            # The short contexts: x[t + 1 - short .. t] for every tail target t, one batch.
            cut = x[0, tail.to(x.device).unsqueeze(1) + 1 - short + torch.arange(short, device=x.device)]
            logits = torch.cat([model(part)[:, -1].float() for part in cut.split(64)])
            short_loss = F.cross_entropy(logits, x[0, tail.to(x.device) + 1], reduction="none").cpu()
            full_tail.append(full[tail].mean().item())
            short_tail.append(short_loss.mean().item())
        diff, se = _difference_over_windows(short_tail, full_tail)
        return {"seq_len": L, "short": short, "targets": f"positions {L - short}-{L - 1}", "windows": len(starts),
                "loss_full_context": sum(full_tail) / len(full_tail),
                "loss_short_context": sum(short_tail) / len(short_tail),
                "difference": diff, "standard_error": se, "uses_context": bool(diff > 2 * se),
                "loss_by_position": (by_position / len(starts)).tolist()}

    @torch.no_grad()
    def copy_probe(self, model, split: str, short: int, windows: int = 32, seed: int = 0) -> Dict:
        """Can the model copy from further back than `short` characters? Each
        of `windows` inputs of seq_len characters is a run of `short`
        characters of the split's words in random order (so only the run
        itself predicts it), the split's text, and the same run again, ending
        the input: the two copies lie seq_len - short characters apart. The
        loss on the first copy and on the second (each without its first
        character); a model that looks back that far predicts the second
        from the first. The standard error is over windows."""
        L = self.seq_len
        if not 0 < short <= L // 2:
            raise ValueError(f"copy_probe: short must lie in (0, seq_len / 2 = {L // 2}], got {short}")
        stream = self.streams[split]
        words = self.tokenizer.decode(stream.tolist()).split()
        generator = torch.Generator().manual_seed(seed)
        fillers = torch.linspace(0, len(stream) - L - 1, windows).long().tolist()
        first, second = [], []
        for start in fillers:
            picked = torch.randint(0, len(words), (short,), generator=generator).tolist()
            run = torch.tensor(self.tokenizer.encode(" ".join(words[i] for i in picked)))[:short]
            x = torch.cat([run, stream[start:start + L - 2 * short], run]).unsqueeze(0)
            (x,) = self._on_device(x)
            nll = F.cross_entropy(model(x[:, :-1])[0].float(), x[0, 1:], reduction="none").cpu()
            first.append(nll[: short - 1].mean().item())  # targets x[1 .. short - 1]
            second.append(nll[L - short:].mean().item())  # targets x[L - short + 1 .. L - 1]
        diff, se = _difference_over_windows(first, second)
        return {"run": short, "distance": L - short, "windows": windows,
                "loss_first_copy": sum(first) / len(first), "loss_second_copy": sum(second) / len(second),
                "difference": diff, "standard_error": se, "copies": bool(diff > 2 * se)}


def _difference_over_windows(a, b):
    """The mean of a - b over windows (one loss per window in each list) and
    its standard error over them (nan for one window): the targets of one
    window are not independent, the windows are."""
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = (diff.std() / math.sqrt(len(diff))).item() if len(diff) > 1 else float("nan")
    return diff.mean().item(), se


class BertTask(TextTask):
    model_type = "bert"
    mask_prob = 0.15  # evaluation always masks BERT's 15%, whatever training used

    def __init__(self, config, seq_len=0, data_fraction=1.0, cache=None, tokenizer=None, train_mask_prob=mask_prob):
        if not 0 < train_mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {train_mask_prob}")
        super().__init__(config, seq_len, data_fraction, cache, tokenizer)
        self.train_mask_prob = train_mask_prob

    @staticmethod
    def make_tokenizer(config, cache):
        return data.sentencepiece_tokenizer(config["vocab_size"], cache)

    def mask(self, windows: torch.Tensor, generator: torch.Generator, mask_prob: float = mask_prob):
        tok = self.tokenizer
        x = torch.cat([torch.full((len(windows), 1), tok.cls_id), windows], 1)
        chosen = torch.rand(x.shape, generator=generator) < mask_prob
        chosen[:, 0] = False
        if not chosen.any():
            chosen[:, 1] = True
        labels = torch.where(chosen, x, torch.full_like(x, -100))
        roll = torch.rand(x.shape, generator=generator)
        random_ids = torch.randint(5, self.config["vocab_size"], x.shape, generator=generator)
        inputs = torch.where(chosen & (roll < 0.8), torch.full_like(x, tok.mask_id), x)
        inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
        return inputs, labels

    def batch(self, generator, batch_size):
        stream = self.streams["train"]
        starts = torch.randint(0, len(stream) - self.seq_len, (batch_size,), generator=generator)
        return self._on_device(*self.mask(self.windows("train", starts, self.seq_len - 1), generator,
                                          self.train_mask_prob))

    def loss(self, model, batch):
        inputs, labels = batch
        keep = labels != -100
        return F.cross_entropy(model(inputs, predict_mask=keep), labels[keep])

    @torch.no_grad()
    def evaluate(self, model, split, max_batches=0, batch_size=32):
        starts = self.eval_starts(split, self.seq_len - 1, max_batches, batch_size)
        generator = torch.Generator().manual_seed(1234)  # the same masks every evaluation
        total, correct, count = 0.0, 0, 0
        for chunk in starts.split(batch_size):
            inputs, labels = self._on_device(*self.mask(self.windows(split, chunk, self.seq_len - 1), generator))
            keep = labels != -100
            logits = model(inputs, predict_mask=keep)
            total += F.cross_entropy(logits, labels[keep], reduction="sum").item()
            correct += (logits.argmax(-1) == labels[keep]).sum().item()
            count += int(keep.sum())
        return {"loss": total / count, "masked_accuracy": correct / count, "masked_tokens": count}


class ViTTask(Task):
    model_type = "vit"

    def __init__(self, config, seq_len=0, data_fraction=1.0, cache=None, tokenizer=None):
        super().__init__(config, data_fraction)
        if (config["image_size"], config["num_channels"], config["num_labels"]) != (8, 1, 10):
            raise ValueError("the digits task needs image_size 8, num_channels 1 and num_labels 10")
        self.splits = {s: (x[: self._slice(len(x))], y[: self._slice(len(y))])
                       for s, (x, y) in data.digits(cache).items()}

    def batch(self, generator, batch_size):
        x, y = self.splits["train"]
        idx = torch.randint(0, len(y), (batch_size,), generator=generator)
        images = F.pad(x[idx], (1, 1, 1, 1))
        dx, dy = torch.randint(0, 3, (2, batch_size), generator=generator)
        shifted = torch.stack([img[:, a:a + 8, b:b + 8] for img, a, b in zip(images, dy.tolist(), dx.tolist())])
        return self._on_device(shifted, y[idx])

    def loss(self, model, batch):
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model, split, max_batches=0, batch_size=32):
        x, y = self.splits[split]
        logits = torch.cat([model(*self._on_device(chunk)).cpu() for chunk in x.split(256)])
        return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(-1) == y).float().mean().item(),
                "images": len(y)}


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (characters or words)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def error_rates(references, hypotheses) -> Dict[str, float]:
    """Character and word error rates of transcripts against their references."""
    char_errors = sum(edit_distance(r, h) for r, h in zip(references, hypotheses))
    word_errors = sum(edit_distance(r.split(), h.split()) for r, h in zip(references, hypotheses))
    return {"cer": char_errors / sum(len(r) for r in references),
            "wer": word_errors / sum(len(r.split()) for r in references)}


class SpeechTask(Task):
    model_type = "speech"
    snr_db = (10.0, 30.0)

    def __init__(self, config, seq_len=0, data_fraction=1.0, cache=None, tokenizer=None):
        super().__init__(config, data_fraction)
        self.labels = data.SpeechLabels()
        blank = self.labels.blank_id
        if config["vocab_size"] != self.labels.vocab_size or config.get("blank_id", 0) != blank:
            raise ValueError(f"the spoken-digits task needs vocab_size {self.labels.vocab_size} and blank_id {blank} "
                             f"(blank, space and the letters {self.labels.symbols[1:]!r})")
        if config.get("sample_rate", data.SPEECH_SAMPLE_RATE) != data.SPEECH_SAMPLE_RATE:
            raise ValueError(f"the spoken-digits audio is at {data.SPEECH_SAMPLE_RATE} Hz; the model's sample_rate "
                             f"is {config['sample_rate']}")
        self.splits = {}
        for split, part in data.spoken_digits(cache).items():
            n = self._slice(len(part["audio"]))
            self.splits[split] = (part["audio"][:n], part["text"][:n])

    def _collate(self, indices, split, generator):
        audio, texts = self.splits[split]
        clips = [audio[i].float() / 32768.0 for i in indices]
        lengths = torch.tensor([len(c) for c in clips])
        waves = torch.zeros(len(clips), int(lengths.max()))
        for row, clip in zip(waves, clips):
            row[: len(clip)] = clip
        # White noise at a random signal-to-noise ratio, relative to each clip's power.
        low, high = self.snr_db
        snr = low + (high - low) * torch.rand(len(clips), generator=generator)
        power = torch.stack([c.square().mean() for c in clips])
        noise = torch.randn(waves.shape, generator=generator) * (power / 10 ** (snr / 10)).sqrt().unsqueeze(1)
        waves = (waves + noise) * (torch.arange(waves.shape[1]).unsqueeze(0) < lengths.unsqueeze(1))
        encoded = [self.labels.encode(texts[i]) for i in indices]
        target_lengths = torch.tensor([len(t) for t in encoded])
        targets = torch.zeros(len(encoded), int(target_lengths.max()), dtype=torch.long)
        for row, t in zip(targets, encoded):
            row[: len(t)] = torch.tensor(t)
        return self._on_device(waves, lengths, targets, target_lengths)

    def save_tokenizer(self, directory):
        self.labels.save(directory)

    def batch(self, generator, batch_size):
        n = len(self.splits["train"][0])
        return self._collate(torch.randint(0, n, (batch_size,), generator=generator).tolist(), "train", generator)

    def units_per_batch(self, batch):
        return int(batch[1].sum())  # audio samples

    def _ctc(self, model, batch, reduction="mean"):
        waves, lengths, targets, target_lengths = batch
        log_probs, frames = model(waves, lengths)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, frames, target_lengths, blank=self.labels.blank_id,
                          reduction=reduction, zero_infinity=True)
        return loss, log_probs, frames

    def loss(self, model, batch):
        return self._ctc(model, batch)[0]

    def transcribe(self, model, split, indices, generator):
        batch = self._collate(indices, split, generator)
        loss, log_probs, frames = self._ctc(model, batch, reduction="sum")
        return loss.item(), [self.labels.decode(ids) for ids in model.greedy_decode(log_probs, frames)]

    @torch.no_grad()
    def evaluate(self, model, split, max_batches=0, batch_size=32):
        audio, texts = self.splits[split]
        order = list(range(len(audio)))
        if max_batches:
            order = order[: max_batches * batch_size]
        generator = torch.Generator().manual_seed(1234)  # the same noise every evaluation
        total, heard = 0.0, []
        for start in range(0, len(order), batch_size):
            loss, hypotheses = self.transcribe(model, split, order[start:start + batch_size], generator)
            total += loss
            heard += hypotheses
        return {"loss": total / len(order), **error_rates([texts[i] for i in order], heard),
                "utterances": len(order)}


class SpeechSeq2SeqTask(SpeechTask):
    """Teacher forcing: the decoder reads the start token and the transcript
    and predicts the transcript and the end token; the loss is that
    cross-entropy (per character) plus ctc_weight times the encoder's CTC
    loss, which makes the encoder learn the alignment early (Kim, Hori and
    Watanabe 2017, joint CTC-attention)."""

    model_type = "speech_seq2seq"
    ctc_weight = 0.3

    def __init__(self, config, seq_len=0, data_fraction=1.0, cache=None, tokenizer=None):
        super().__init__(config, seq_len, data_fraction, cache, tokenizer)
        self.bos, self.eos = config["bos_token_id"], config["eos_token_id"]

    def _teacher_forcing(self, targets, target_lengths):
        """(decoder inputs: start + transcript, labels: transcript + end, -100 past it)."""
        B, N = targets.shape
        inputs = torch.cat([torch.full((B, 1), self.bos, dtype=torch.long, device=targets.device), targets], 1)
        positions = torch.arange(N + 1, device=targets.device).unsqueeze(0)
        labels = torch.cat([targets, torch.zeros(B, 1, dtype=torch.long, device=targets.device)], 1)
        labels = labels.masked_fill(positions == target_lengths.unsqueeze(1), self.eos)
        return inputs, labels.masked_fill(positions > target_lengths.unsqueeze(1), -100)

    def _losses(self, model, batch, reduction="mean"):
        waves, lengths, targets, target_lengths = batch
        inputs, labels = self._teacher_forcing(targets, target_lengths)
        logits, log_probs, frames = model(waves, lengths, inputs)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction=reduction)
        ctc = F.ctc_loss(log_probs.transpose(0, 1), targets, frames, target_lengths, blank=self.labels.blank_id,
                         reduction=reduction, zero_infinity=True)
        return ce, ctc

    def loss(self, model, batch):
        ce, ctc = self._losses(model, batch)
        return ce + self.ctc_weight * ctc

    def transcribe(self, model, split, indices, generator, searches=((1, 0.0),)):
        """(summed decoder cross-entropy, its character count, [transcripts per
        search]); a search is (beam_size, ctc_weight), all on the same audio."""
        batch = self._collate(indices, split, generator)
        ce, _ = self._losses(model, batch, reduction="sum")
        heard = [[self.labels.decode(t) for t in model.transcribe(batch[0], batch[1], beam_size=k, ctc_weight=w)]
                 for k, w in searches]
        return ce.item(), int(batch[3].sum()) + len(indices), heard

    @torch.no_grad()
    def evaluate(self, model, split, max_batches=0, batch_size=32, beam_size=0, ctc_weight=0.3):
        """Greedy CER and WER and the decoder's teacher-forced loss (nats per
        character, the end token counted); with beam_size > 1 also those of
        beam search by the decoder alone (cer_beam, wer_beam) and jointly with
        the CTC head's prefix scores at ctc_weight (cer_joint, wer_joint)."""
        audio, texts = self.splits[split]
        order = list(range(len(audio)))
        if max_batches:
            order = order[: max_batches * batch_size]
        searches = [(1, 0.0)] + ([(beam_size, 0.0), (beam_size, ctc_weight)] if beam_size > 1 else [])
        generator = torch.Generator().manual_seed(1234)  # the same noise every evaluation
        total, chars, heard = 0.0, 0, [[] for _ in searches]
        for start in range(0, len(order), batch_size):
            loss, count, batch_heard = self.transcribe(model, split, order[start:start + batch_size], generator,
                                                       searches)
            total, chars = total + loss, chars + count
            for all_heard, more in zip(heard, batch_heard):
                all_heard += more
        references = [texts[i] for i in order]
        result = {"loss": total / chars, **error_rates(references, heard[0]), "utterances": len(order)}
        if beam_size > 1:
            beam, joint = error_rates(references, heard[1]), error_rates(references, heard[2])
            result.update({"cer_beam": beam["cer"], "wer_beam": beam["wer"], "cer_joint": joint["cer"],
                           "wer_joint": joint["wer"], "beam_size": beam_size, "ctc_weight": ctc_weight})
        return result


TASKS = {t.model_type: t for t in (GPTTask, BertTask, ViTTask, SpeechTask, SpeechSeq2SeqTask)}

# The headline metric of each kind and whether larger is better.
HEADLINE = {"gpt": ("loss", False), "bert": ("masked_accuracy", True), "vit": ("accuracy", True),
            "speech": ("cer", False), "speech_seq2seq": ("cer", False)}


def task_for(config: dict, **kw) -> Task:
    kind = config["model_type"]
    if kind not in TASKS:
        raise ValueError(f"no pretraining task for model_type {kind!r} yet (have: {', '.join(TASKS)})")
    return TASKS[kind](config, **kw)
