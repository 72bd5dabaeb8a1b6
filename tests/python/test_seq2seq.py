"""The speech encoder-decoder (speech_seq2seq): its config, teacher forcing,
the KV cache, greedy and beam-search transcription against Python
references, the joint loss, `attnzoo-cli transcribe` against Python, and the
cross-attention alignment plot."""
import functools
import itertools
import json
import math
import os
import subprocess
import wave

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import data, tasks
from attnzoo.models import SpeechSeq2Seq, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, os.environ.get("ATTNZOO_BUILD_DIR", "build"), "attnzoo-cli")
TINY = {"model_type": "speech_seq2seq", "vocab_size": 17, "hidden_size": 32, "num_layers": 1, "num_heads": 4,
        "n_mels": 40, "subsampling_channels": 4, "num_decoder_layers": 2, "dropout": 0.0}
# The decoder's self-attention kinds with a KV cache, and two without one.
CACHED_KINDS = [{"kind": "dense"}, {"kind": "rotary"}, {"kind": "alibi"}, {"kind": "t5"}, {"kind": "shaw"},
                {"kind": "local", "window": 2}, {"kind": "block_sparse", "layout": "local", "block_size": 2}]
UNCACHED_KINDS = [{"kind": "linear"}, {"kind": "lsh", "bucket_size": 2}]


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return SpeechSeq2Seq({**TINY, **overrides}).eval()


def utterances(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 9000, generator=g) * 0.3, torch.tensor([9000, 6500, 4000])


TRAINED_LENGTHS = [1, 3, 5, 2, 4, 7]


@functools.lru_cache(maxsize=None)
def trained(kind: str, vocab: int = 17):
    """(model, waveforms, lengths): a tiny model taught, with teacher forcing,
    transcripts of TRAINED_LENGTHS labels for six noise utterances. An
    untrained model with a tied embedding copies its input, the start token,
    which is also the end token, so it ends at once: decoding needs a model
    whose transcripts end at varied lengths, and with some uncertainty left
    (the loss stays near 0.5) so that beams differ."""
    torch.manual_seed(0)
    model = SpeechSeq2Seq({**TINY, "vocab_size": vocab, "decoder_attention": {"kind": kind}}).train()
    g = torch.Generator().manual_seed(1)
    waves = torch.randn(6, 9000, generator=g) * 0.3
    lengths = torch.tensor([9000, 8000, 7000, 6500, 5000, 4000])
    targets = torch.zeros(6, max(TRAINED_LENGTHS), dtype=torch.long)
    for row, n in zip(targets, TRAINED_LENGTHS):
        row[:n] = torch.randint(1, vocab, (n,), generator=g)
    task = tasks.SpeechSeq2SeqTask.__new__(tasks.SpeechSeq2SeqTask)
    task.bos = task.eos = 0
    inputs, labels = task._teacher_forcing(targets, torch.tensor(TRAINED_LENGTHS))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(60):
        loss = F.cross_entropy(model(waves, lengths, inputs)[0].flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), waves, lengths


def test_config_defaults_round_trip_and_errors():
    config = load_config(TINY)
    assert config["bos_token_id"] == config["eos_token_id"] == config["blank_id"] == 0
    assert config["cross_attention"] == {"kind": "dense"} and config["decoder_attention"] == {"kind": "dense"}
    assert load_config(config) == config
    mixed = load_config({**TINY, "decoder_attention": [{"kind": "rotary"}, {"kind": "t5"}], "blank_id": 3})
    assert [a["kind"] for a in mixed["decoder_attention"]] == ["rotary", "t5"] and mixed["bos_token_id"] == 3
    bad = [({"cross_attention": {"kind": "rotary"}}, "'cross_attention.kind' must be \"dense\" or \"linear\""),
           ({"decoder_attention": {"kind": "longformer"}}, "'decoder_attention.kind' \"longformer\" attention is "
                                                           "bidirectional"),
           ({"decoder_attention": [{"kind": "dense"}]}, "'decoder_attention' has 1 entries for 2 layers"),
           ({"num_decoder_layers": 0}, "'num_decoder_layers' must be in [1, 1024]"),
           ({"eos_token_id": 17}, "'eos_token_id' must be in [0, 16]"),
           ({"decoder_attention": {"kind": "dense", "window": 3}}, "'decoder_attention.window' does not apply")]
    for overrides, message in bad:
        with pytest.raises(ValueError) as error:
            load_config({**TINY, **overrides})
        assert message in str(error.value), (overrides, str(error.value))
    with pytest.raises(ValueError, match="'cross_attention' does not apply to model_type \"speech\""):
        load_config({"model_type": "speech", "cross_attention": {"kind": "dense"}})


@pytest.mark.parametrize("kind", CACHED_KINDS + UNCACHED_KINDS, ids=lambda k: k["kind"])
def test_cached_decoding_equals_the_full_decoder(kind):
    model = tiny(decoder_attention=kind)
    waves, lengths = utterances()
    ids = torch.randint(1, 17, (3, 7), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 0
    torch.manual_seed(3)  # LSH draws its rotations per call
    logits, ctc, frames = model(waves, lengths, ids)
    encoded, frames2 = model.encode(waves, lengths)
    assert torch.equal(frames, frames2) and ctc.shape[:2] == encoded.shape[:2]
    torch.manual_seed(3)
    assert torch.allclose(model.decode(ids, encoded, frames), logits, atol=1e-6)
    if not model.supports_kv_cache:
        assert kind in UNCACHED_KINDS
        return
    cache = attnzoo._C.KVCache()
    steps = [model.decode(ids[:, :3], encoded, frames, cache)] + [
        model.decode(ids[:, t:t + 1], encoded, frames, cache) for t in range(3, 7)]
    assert cache.length == 7
    assert torch.allclose(torch.cat(steps, 1), logits, atol=1e-5)


def test_padded_frames_and_other_utterances_change_nothing():
    model = tiny(decoder_attention={"kind": "rotary"})
    waves, lengths = utterances()
    ids = torch.tensor([[0, 5, 6, 7]] * 3)
    logits = model(waves, lengths, ids)[0]
    alone = model(waves[2:, :4000], None, ids[2:])[0]
    assert torch.allclose(logits[2:], alone, atol=1e-4)
    maps = model.cross_attention_maps(waves, lengths, ids)
    frames = model.encode(waves, lengths)[1]
    assert len(maps) == 2 and maps[0].shape == (3, 4, 4, int(frames.max()))
    assert torch.allclose(maps[1].sum(-1), torch.ones(3, 4, 4), atol=1e-5)
    assert float(maps[0][2, :, :, int(frames[2]):].abs().max()) == 0.0  # padded frames get nothing
    assert model.cross_attention_maps(waves, lengths, ids) is not None and not model._cpp.take_attention_maps()


def python_greedy(model, waves, lengths, max_length):
    """Greedy decoding written out: the full decoder over the growing prefix."""
    encoded, frames = model.encode(waves, lengths)
    out = []
    for b in range(waves.shape[0]):
        prefix = [0]
        for _ in range(max_length):
            nxt = int(model.decode(torch.tensor([prefix]), encoded[b:b + 1], frames[b:b + 1])[0, -1].argmax())
            if nxt == 0:
                break
            prefix.append(nxt)
        out.append(prefix[1:])
    return out


@pytest.mark.parametrize("kind", ["rotary", "linear"])
def test_greedy_transcription_follows_the_argmax(kind):
    model, waves, lengths = trained(kind)
    expected = python_greedy(model, waves, lengths, 6)
    assert model.transcribe(waves, lengths, max_length=6) == expected
    assert model.transcribe(waves, lengths, max_length=6, use_cache=False) == expected
    assert sorted(map(len, expected)) == [1, 2, 3, 4, 5, 6], expected  # five end by themselves, one at the cap


@torch.no_grad()
def sequence_log_prob(model, encoded, frames, labels):
    """log p(labels, end) under teacher forcing."""
    ids = torch.tensor([[0, *labels]])
    log_probs = model.decode(ids, encoded, frames)[0].double().log_softmax(-1)
    targets = list(labels) + [0]
    return sum(float(log_probs[t, y]) for t, y in enumerate(targets))


def best_by_enumeration(score):
    """The transcript of up to 2 labels (of 1, 2, 3) maximising score(labels)."""
    every = [labels for n in range(3) for labels in itertools.product([1, 2, 3], repeat=n)]
    return max(every, key=score)


@pytest.mark.parametrize("penalty", [1.0, 0.0])
def test_beam_search_with_room_for_every_prefix_finds_the_best_transcript(penalty):
    # Vocabulary 4 (the end token and 3 labels), at most 3 steps: 27 beams hold
    # every prefix, so the beam search is exhaustive and must return the best
    # of all transcripts of up to 2 labels + end, by log p / length^penalty.
    model, waves, lengths = trained("rotary", vocab=4)
    encoded, frames = model.encode(waves, lengths)
    found = model.transcribe(waves, lengths, beam_size=27, max_length=3, length_penalty=penalty)
    for b in range(len(found)):
        best = best_by_enumeration(
            lambda labels: sequence_log_prob(model, encoded[b:b + 1], frames[b:b + 1], labels) /
            (len(labels) + 1) ** penalty)
        assert tuple(found[b]) == best, (b, found[b], best)
    # The same with and without the cache.
    assert model.transcribe(waves, lengths, beam_size=27, max_length=3, length_penalty=penalty,
                            use_cache=False) == found
    assert len({tuple(t) for t in found}) >= 2  # not one answer for every utterance


@torch.no_grad()
def python_beam_search(model, encoded, frames, beam_size, max_length, penalty):
    """Beam search written out for one utterance, with the engine's pruning
    (the 2K best continuations; those that end are set aside, the K best
    others live on) but no early stop: it runs all max_length steps, so it
    sees every transcript that pruning lets end."""
    live, ended = [((), 0.0)], []
    for _ in range(max_length):
        continuations = []
        for labels, score in live:
            log_probs = model.decode(torch.tensor([[0, *labels]]), encoded, frames)[0, -1].double().log_softmax(-1)
            continuations += [(score + float(lp), labels, v) for v, lp in enumerate(log_probs)]
        continuations.sort(key=lambda c: -c[0])
        live = []
        for score, labels, v in continuations[:2 * beam_size]:
            if v == 0:
                ended.append((score / (len(labels) + 1) ** penalty, labels))
            elif len(live) < beam_size:
                live.append(((*labels, v), score))
    if not ended:  # the cap reached with nothing ended: the live beams compete as they stand
        ended = [(score / len(labels) ** penalty, labels) for labels, score in live]
    return list(max(ended)[1])


@pytest.mark.parametrize("vocab", [17, 4])
@pytest.mark.parametrize("beam_size,penalty", [(2, 1.0), (3, 1.0), (2, 0.0), (2, 0.5)])
def test_beam_search_stops_only_when_no_live_beam_can_win(beam_size, penalty, vocab):
    # Few beams: pruning is real, and poor transcripts end early while the
    # best still grows. The engine stops early (once no live beam can outrank
    # the best ended transcript), which must not change the answer of a
    # search that runs every step. Stopping at the first K ended transcripts
    # failed this, and made beam search worse than greedy on speech-digits.
    model, _, _ = trained("rotary", vocab)
    g = torch.Generator().manual_seed(7)  # unheard noise: uncertain transcripts, beams that differ
    waves, lengths = torch.randn(12, 9000, generator=g) * 0.3, torch.randint(3000, 9001, (12,), generator=g)
    encoded, frames = model.encode(waves, lengths)
    found = model.transcribe(waves, lengths, beam_size=beam_size, max_length=8, length_penalty=penalty)
    expected = [python_beam_search(model, encoded[b:b + 1], frames[b:b + 1], beam_size, 8, penalty)
                for b in range(len(found))]
    assert found == expected
    assert model.transcribe(waves, lengths, beam_size=beam_size, max_length=8, length_penalty=penalty,
                            use_cache=False) == expected


def test_transcribe_refuses_bad_options():
    model = tiny()
    waves, lengths = utterances()
    for kwargs, message in [({"beam_size": 0}, "beam_size must be >= 1"),
                            ({"max_length": -1}, "max_length must be >= 0"),
                            ({"length_penalty": math.inf}, "length_penalty must be finite")]:
        with pytest.raises(RuntimeError, match=message):
            model.transcribe(waves, lengths, **kwargs)
    encoded, frames = model.encode(waves, lengths)
    with pytest.raises(RuntimeError, match="decoder_input_ids must lie in"):
        model.decode(torch.tensor([[0, 17]] * 3), encoded, frames)
    with pytest.raises(RuntimeError, match="encoded must have shape"):
        model.decode(torch.tensor([[0]]), encoded, frames)


@pytest.mark.parametrize("kind", [{"kind": "rotary"}, {"kind": "block_sparse", "layout": "local", "block_size": 2},
                                  {"kind": "lsh", "bucket_size": 2}], ids=lambda k: k["kind"])
def test_joint_loss_trains_encoder_and_decoder(kind):
    config = load_config({**TINY, "decoder_attention": kind, "cross_attention": {"kind": "linear"}
                          if kind["kind"] == "lsh" else {"kind": "dense"}})
    task = tasks.SpeechSeq2SeqTask.__new__(tasks.SpeechSeq2SeqTask)
    tasks.Task.__init__(task, config)
    task.labels, task.bos, task.eos = data.SpeechLabels(), 0, 0
    targets = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    target_lengths = torch.tensor([4, 2])
    inputs, labels = task._teacher_forcing(targets, target_lengths)
    assert inputs.tolist() == [[0, 5, 6, 7, 8], [0, 9, 10, 0, 0]]
    assert labels.tolist() == [[5, 6, 7, 8, 0], [9, 10, 0, -100, -100]]
    torch.manual_seed(0)
    model = SpeechSeq2Seq(config).train()
    waves, lengths = utterances()
    batch = (waves[:2], lengths[:2], targets, target_lengths)
    torch.manual_seed(4)  # LSH draws its rotations per call
    ce, ctc = task._losses(model, batch)
    torch.manual_seed(4)
    logits = model(waves[:2], lengths[:2], inputs)[0]
    assert torch.allclose(ce, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), atol=1e-5)
    loss = task.loss(model, batch)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(model.decoder_layers[1].cross_attn.q_proj.weight.grad.abs().sum()) > 0
    assert float(model.layers[0].attn.q_proj.weight.grad.abs().sum()) > 0


def test_checkpoints_round_trip_through_both_languages(tmp_path):
    model = tiny(decoder_attention={"kind": "rotary"})
    model.save_pretrained(tmp_path / "ckpt")
    again = attnzoo.from_pretrained(tmp_path / "ckpt")
    cpp = attnzoo.models.from_pretrained_cpp(tmp_path / "ckpt")
    waves, lengths = utterances()
    ids = torch.tensor([[0, 3, 4]] * 3)
    expected = model(waves, lengths, ids)[0]
    assert isinstance(again, SpeechSeq2Seq) and isinstance(cpp, SpeechSeq2Seq)
    assert torch.equal(again(waves, lengths, ids)[0], expected) and torch.equal(cpp(waves, lengths, ids)[0], expected)


# ---------------------------------------------------------------------------
# attnzoo-cli transcribe

def write_wav(path, samples: torch.Tensor, rate=16000, width=2):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(samples.to(torch.int16).numpy().tobytes())


def cli(*args):
    assert os.path.exists(CLI), f"{CLI} is missing: build with tools/build.sh"
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_transcripts_equal_python(tmp_path):
    model, waves, lengths = trained("rotary")
    model.save_pretrained(tmp_path / "ckpt")
    data.SpeechLabels().save(str(tmp_path / "ckpt"))
    clips = [(wave[:n] * 32768).round().clamp(-32768, 32767) for wave, n in zip(waves, lengths)]
    files = []
    for i, clip in enumerate(clips):
        files.append(tmp_path / f"u{i}.wav")
        write_wav(files[-1], clip)
    labels = data.SpeechLabels()
    for beam, weight in ((1, 0.0), (3, 0.0), (3, 0.4)):
        expected = [model.transcribe(clip.to(torch.int16).float().unsqueeze(0) / 32768.0, beam_size=beam,
                                     max_length=20, ctc_weight=weight)[0] for clip in clips]
        assert len({len(t) for t in expected}) > 3  # transcripts of several lengths
        p = cli("transcribe", tmp_path / "ckpt", *files, "--beam-size", beam, "--max-length", 20,
                "--ctc-weight", weight, "--json", tmp_path / "out.json")
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == [labels.decode(t) for t in expected]
        assert [r["ids"] for r in json.loads((tmp_path / "out.json").read_text())] == expected
        assert "real time" in p.stderr and ("beam 3" if beam == 3 else "greedy") in p.stderr
        assert ("CTC weight 0.4" in p.stderr) == (weight > 0)
    os.remove(tmp_path / "ckpt" / "tokenizer.json")  # without labels: the ids
    greedy = model.transcribe(clips[0].to(torch.int16).float().unsqueeze(0) / 32768.0, max_length=20)[0]
    p = cli("transcribe", tmp_path / "ckpt", files[0], "--max-length", 20)
    assert p.returncode == 0 and p.stdout.strip() == ",".join(map(str, greedy))


def test_cli_transcribe_errors_name_the_problem(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "ckpt")
    write_wav(tmp_path / "8k.wav", torch.zeros(4000) + 100, rate=8000)
    (tmp_path / "text.wav").write_text("not audio")
    write_wav(tmp_path / "empty.wav", torch.zeros(0))
    gpt = attnzoo.models.GPT({"vocab_size": 16, "hidden_size": 16, "num_layers": 1, "num_heads": 2})
    gpt.save_pretrained(tmp_path / "gpt")
    for args, code, message in [
        ([tmp_path / "ckpt"], 2, "transcribe needs at least one WAV file"),
        ([tmp_path / "ckpt", tmp_path / "8k.wav"], 1, "sampled at 8000 Hz; the model takes 16000 Hz"),
        ([tmp_path / "ckpt", tmp_path / "text.wav"], 1, "text.wav: not a RIFF/WAVE file"),
        ([tmp_path / "ckpt", tmp_path / "empty.wav"], 1, "empty.wav: holds no samples"),
        ([tmp_path / "ckpt", tmp_path / "missing.wav"], 1, "cannot read"),
        ([tmp_path / "ckpt", tmp_path / "8k.wav", "--beam-size", "0"], 2, "--beam-size must be >= 1"),
        ([tmp_path / "gpt", tmp_path / "8k.wav"], 1, "different model_type"),
    ]:
        p = cli("transcribe", *args)
        assert p.returncode == code and message in p.stderr, (args, p.returncode, p.stderr)


# ---------------------------------------------------------------------------
# plot-attention: the alignment

def test_plot_attention_draws_the_cross_attention_alignment(tmp_path):
    from attnzoo.plot import plot_alignment, plot_attention

    model, waves, _ = trained("rotary")
    model.save_pretrained(tmp_path / "ckpt")
    out = plot_alignment(model, "tiny", waves[:1], str(tmp_path / "align.png"))
    assert os.path.getsize(out) > 10_000
    with pytest.raises(ValueError, match=r"layers must be in \[0, 2\) \(decoder layers\), got 2"):
        plot_alignment(model, "tiny", waves[:1], str(tmp_path / "x.png"), [2])
    with pytest.raises(ValueError, match="one decoder layer's alignment"):
        plot_alignment(model, "tiny", waves[:1], str(tmp_path / "x.png"), [0, 1])
    linear = tiny(cross_attention={"kind": "linear"})
    with pytest.raises(ValueError, match="linear cross-attention never forms the probability matrix"):
        plot_alignment(linear, "tiny", waves[:1], str(tmp_path / "x.png"))
    # Through the command's function, on a held-out utterance.
    assert os.path.exists(plot_attention(str(tmp_path / "ckpt"), str(tmp_path / "cmd.png"), index=2))


def test_cli_agreement_counts_identical_transcripts(tmp_path):
    from attnzoo.evaluate import cli_agreement

    model = trained("rotary")[0]
    model.save_pretrained(tmp_path / "ckpt")
    task = tasks.task_for(model.config)
    result = cli_agreement(str(tmp_path / "ckpt"), model, task, "test", CLI, beam_size=2, ctc_weight=0.3, limit=3)
    assert result["utterances"] == 3 and result["identical"] == 3 and result["beam_size"] == 2
    with pytest.raises(RuntimeError, match="transcribe failed: .*different model_type"):
        attnzoo.models.GPT({"vocab_size": 16, "hidden_size": 16, "num_layers": 1, "num_heads": 2}).save_pretrained(
            tmp_path / "gpt")
        cli_agreement(str(tmp_path / "gpt"), model, task, "test", CLI, limit=1)


@pytest.mark.parametrize("weight", [0.3, 0.7])
def test_joint_ctc_beam_search_with_room_for_every_prefix_finds_the_best_joint_score(weight):
    # As above, with the CTC head: an exhaustive beam must return the
    # transcript g maximising ((1 - w) log p_decoder(g, end) + w log p_ctc(g)) / (|g| + 1),
    # with p_ctc from torch's own CTC loss. That checks the prefix scores.
    model, waves, lengths = trained("rotary", vocab=4)
    encoded, frames = model.encode(waves, lengths)
    ctc_log_probs = model.ctc(waves, lengths)[0].detach().double()
    found = model.transcribe(waves, lengths, beam_size=27, max_length=3, ctc_weight=weight)
    for b in range(len(found)):
        def joint(labels):
            decoder = sequence_log_prob(model, encoded[b:b + 1], frames[b:b + 1], labels)
            ctc = -F.ctc_loss(ctc_log_probs[b:b + 1, :frames[b]].transpose(0, 1),
                              torch.tensor([labels], dtype=torch.long).view(1, len(labels)), frames[b:b + 1],
                              torch.tensor([len(labels)]), blank=0, reduction="sum").item()
            return ((1 - weight) * decoder + weight * ctc) / (len(labels) + 1)

        best = best_by_enumeration(joint)
        assert tuple(found[b]) == best, (b, found[b], best)
    assert model.transcribe(waves, lengths, beam_size=27, max_length=3, ctc_weight=weight, use_cache=False) == found
    # One beam with the CTC head is a joint greedy search, not the decoder's greedy one.
    assert len(model.transcribe(waves, lengths, ctc_weight=weight, max_length=3)) == 6
    with pytest.raises(RuntimeError, match=r"ctc_weight must be in \[0, 1\)"):
        model.transcribe(waves, lengths, ctc_weight=1.0)
