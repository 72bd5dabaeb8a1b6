"""Pretraining and evaluation on tiny slices of the embedded data: a smoke run
of every model kind, exact resume after SIGKILL, DDP against one process,
the evaluate output, and clear errors before training starts."""
import errno
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import attnzoo
from attnzoo import data
from attnzoo.evaluate import evaluate
from attnzoo.train import TrainOptions, lr_at, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TEXT = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64}


def tiny(**kw):
    base = dict(steps=12, batch_size=4, eval_every=6, eval_batches=2, seq_len=32, data_fraction=0.02, log_every=3,
                warmup_steps=3)
    base.update(kw)
    return TrainOptions(**base)


def weights(directory):
    return attnzoo.from_pretrained(directory).state_dict()


@pytest.mark.parametrize("model,overrides", [
    ("gpt-kjv", TINY_TEXT),
    ("gpt-kjv-lsh", {**TINY_TEXT, "attention": {"kind": "lsh", "bucket_size": 8}}),
    ("bert-kjv", {**TINY_TEXT, "vocab_size": 512}),
    ("vit-digits", {"num_layers": 2, "hidden_size": 32}),
    ("speech-digits", {"num_layers": 1, "hidden_size": 32, "subsampling_channels": 4, "conv_kernel_size": 3}),
    ("speech-digits-s2s", {"num_layers": 1, "hidden_size": 32, "subsampling_channels": 4, "conv_kernel_size": 3,
                           "num_decoder_layers": 1}),
])
def test_smoke_pretrain_and_evaluate_every_kind(tmp_path, model, overrides, capsys):
    run = tmp_path / "run"
    final = pretrain(os.path.join(ROOT, "models", model), str(run), tiny(), model_overrides=overrides, quiet=True)
    assert final and all(isinstance(v, (int, float)) for v in final.values())
    for name in ("run.json", "metrics.jsonl", "loss.png", "last/model.safetensors", "last/config.json",
                 "last/trainer_state.json", "last/trainer_state.safetensors", "best/model.safetensors"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    result = evaluate(str(run), "test", max_batches=2, sample_tokens=20)
    printed = capsys.readouterr().out
    saved = json.loads((run / "eval-test.json").read_text())
    assert saved["split"] == "test" and saved["model_type"] == attnzoo.models.load_config(run / "last")["model_type"]
    assert result["loss"] == saved["loss"] and "loss" in printed and "wrote" in printed
    headline = {"gpt": "perplexity", "bert": "masked_accuracy", "vit": "accuracy", "speech": "cer",
                "speech_seq2seq": "cer_joint"}[saved["model_type"]]
    assert headline in saved and headline in printed
    if saved["model_type"] == "gpt":
        assert saved["sample"].startswith("And God said") and len(saved["sample"]) > len("And God said")
    if saved["model_type"] == "bert":
        assert (run / "last" / "tokenizer.model").exists()
    if saved["model_type"] == "speech_seq2seq":  # the labels for attnzoo-cli transcribe
        assert json.loads((run / "last" / "tokenizer.json").read_text())["labels"][1] == " "


def test_warmup_and_cosine_schedule():
    o = TrainOptions(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, o) == pytest.approx(0.1) and lr_at(9, o) == pytest.approx(1.0)
    assert lr_at(10, o) == pytest.approx(1.0) and lr_at(55, o) == pytest.approx(0.55)
    assert lr_at(100, o) == pytest.approx(0.1)
    assert all(lr_at(s, o) >= lr_at(s + 1, o) for s in range(10, 100))


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    return subprocess.Popen([sys.executable, "-m", "attnzoo", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _pretrain_args(out, steps):
    return ["pretrain", os.path.join(ROOT, "models", "gpt-kjv"), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--data-fraction",
            "0.02", "--warmup-steps", "3", "--quiet", "--set", "num_layers=2", "hidden_size=32", "num_heads=4",
            "dropout=0.1"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    steps = 40
    full = _cli(*_pretrain_args(tmp_path / "full", steps))
    assert full.wait(timeout=300) == 0, full.stderr.read()

    killed = _cli(*_pretrain_args(tmp_path / "killed", steps))
    last = tmp_path / "killed" / "last"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and os.path.realpath(last).endswith(("10", "12", "14"))):
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    interrupted_at = json.loads((last / "trainer_state.json").read_text())["step"]
    assert 0 < interrupted_at < steps
    resumed = _cli(*_pretrain_args(tmp_path / "killed", steps))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    a, b = weights(tmp_path / "full" / "last"), weights(tmp_path / "killed" / "last")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    metrics = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    val = lambda run: [(r["step"], r["val_loss"]) for r in metrics(run) if "val_loss" in r]  # noqa: E731
    assert val(tmp_path / "full") == val(tmp_path / "killed")


def test_sigkill_at_random_points_never_loses_the_run(tmp_path):
    """Kills one run again and again at random moments (during start-up,
    training steps, evaluation and checkpoint writes, which happen every step
    here) until it completes; after every kill the last checkpoint must load,
    and the finished run must equal one that was never interrupted."""
    steps = 48
    args = lambda out: [*_pretrain_args(out, steps), "--eval-every", "1"]  # noqa: E731
    start = time.time()
    full = _cli(*args(tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stderr.read()
    duration = time.time() - start
    rng = random.Random(20261129)
    kills, steps_seen = [], []
    run, last = tmp_path / "killed", tmp_path / "killed" / "last"
    for attempt in range(40):
        p = _cli(*args(run))
        delay = rng.uniform(0.3, 0.6 * duration)  # start-up included; shorter than a whole run, so kills happen
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills.append(round(delay, 2))
        else:
            assert p.returncode == 0, p.stderr.read()
            break
        if last.exists():
            state = json.loads((last / "trainer_state.json").read_text())
            attnzoo.from_pretrained(last)  # loads completely
            assert 0 < state["step"] <= steps
            steps_seen.append(state["step"])
    else:
        pytest.fail(f"the run never finished (kills at {kills})")
    assert len(kills) >= 3 and len(set(steps_seen)) >= 3, (duration, kills, steps_seen)
    a, b = weights(tmp_path / "full" / "last"), weights(last)
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed weights differ (kills at {kills}, steps {steps_seen})"


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from attnzoo import train
    real, calls = train._save_trainer_state, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "_save_trainer_state", fail_second)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"writing checkpoint step-000012 failed: .*No space left on device. "
                                           r"The last complete checkpoint, step-000006, is intact"):
        pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(run), tiny(), model_overrides=TINY_TEXT, quiet=True)
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000006"]  # the partial one is removed
    assert os.path.realpath(run / "last").endswith("step-000006")
    monkeypatch.setattr(train, "_save_trainer_state", real)
    pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(run), tiny(), model_overrides=TINY_TEXT,
             quiet=True)  # the same call resumes
    pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(tmp_path / "full"), tiny(), model_overrides=TINY_TEXT,
             quiet=True)
    a, b = weights(tmp_path / "full" / "last"), weights(run / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_size_limit_fails_before_training(tmp_path):
    data.kjv()  # the data cache is not what this test limits

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    p = subprocess.run([sys.executable, "-m", "attnzoo", *_pretrain_args(tmp_path / "run", 4)], preexec_fn=limit,
                       env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "cannot hold a checkpoint" in p.stderr and "File too large" in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path / "run")) == []  # no run.json, no metrics, no probe left behind


def test_two_runs_with_one_seed_give_identical_weights(tmp_path):
    """Also with activation checkpointing (run c): the replayed blocks draw
    the same dropout, so the weights are the same."""
    for name in ("a", "b", "c"):
        pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(tmp_path / name), tiny(steps=6),
                 model_overrides={**TINY_TEXT, "dropout": 0.1}, quiet=True, checkpoint_activations=name == "c")
    a, b, c = (weights(tmp_path / name / "last") for name in ("a", "b", "c"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-6


def test_bfloat16_training_keeps_float32_master_weights(tmp_path):
    """dtype=bfloat16 trains as well as float32 on the same batches, with a
    different trajectory (the products really are bfloat16), float32 weights
    in the checkpoints, and resume."""
    model = os.path.join(ROOT, "models", "gpt-kjv")
    finals = {}
    for dtype in ("float32", "bfloat16"):
        finals[dtype] = pretrain(model, str(tmp_path / dtype), tiny(steps=30, eval_every=30, dtype=dtype),
                                 model_overrides=TINY_TEXT, quiet=True)
    a, b = weights(tmp_path / "float32" / "last"), weights(tmp_path / "bfloat16" / "last")
    assert all(t.dtype == torch.float32 for t in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert abs(finals["bfloat16"]["loss"] - finals["float32"]["loss"]) < 0.05 * finals["float32"]["loss"]
    assert finals["bfloat16"]["loss"] < math.log(256) - 0.5  # learned something (uniform: ln 256)
    # A run.json from before the option existed reads as float32 and resumes.
    run_json = tmp_path / "float32" / "run.json"
    run = json.loads(run_json.read_text())
    del run["options"]["dtype"]
    run_json.write_text(json.dumps(run))
    pretrain(model, str(tmp_path / "float32"), tiny(steps=33, eval_every=30), model_overrides=TINY_TEXT, quiet=True)
    assert json.loads((tmp_path / "float32" / "last" / "trainer_state.json").read_text())["step"] == 33


def test_bfloat16_run_resumes_exactly(tmp_path):
    """A bfloat16 run stopped at step 3 and extended to 6 ends with the very
    weights of one run of 6 steps: its bfloat16 copy is rebuilt from the
    float32 master weights, which is all a checkpoint holds; dropout on."""
    model = os.path.join(ROOT, "models", "gpt-kjv")
    overrides = {**TINY_TEXT, "dropout": 0.1}
    pretrain(model, str(tmp_path / "full"), tiny(steps=6, eval_every=3, dtype="bfloat16"),
             model_overrides=overrides, quiet=True)
    with pytest.warns(UserWarning, match="never leaves warm-up"):  # steps 0-2 are warm-up in both runs
        pretrain(model, str(tmp_path / "parts"), tiny(steps=3, eval_every=3, dtype="bfloat16"),
                 model_overrides=overrides, quiet=True)
    pretrain(model, str(tmp_path / "parts"), tiny(steps=6, eval_every=3, dtype="bfloat16"),
             model_overrides=overrides, quiet=True)
    a, b = weights(tmp_path / "full" / "last"), weights(tmp_path / "parts" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_copy_accumulates_gradients_in_float32_and_rounds_the_master():
    """The copy computes in bfloat16; its gradients land in the master's in
    float32, summed over micro-batches (each addend its own bfloat16 rounding,
    not a bfloat16 running sum); the master's weights come back rounded."""
    from attnzoo.train import _Bfloat16Copy

    config = attnzoo.models.load_config(os.path.join(ROOT, "models", "vit-digits"))
    config.update(num_layers=1, hidden_size=32, dropout=0.0)
    torch.manual_seed(0)
    master = attnzoo.models.MODEL_CLASSES["vit"](config)
    before = torch.get_rng_state()
    bf16 = _Bfloat16Copy(master, config, checkpoint_activations=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(c.dtype == torch.bfloat16 and torch.equal(c.float(), m.bfloat16().float()) for m, c in bf16.pairs)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grads = []
    for scale in (1.0, 1e-3):  # a small second addend would vanish in a bfloat16 running sum
        (bf16.model(images).float().square().sum() * scale).backward()
        grads.append([c.grad.float().clone() for _, c in bf16.pairs])
        bf16.gradients_to_master()
        assert all(c.grad is None for _, c in bf16.pairs)
    for (m, _), g1, g2 in zip(bf16.pairs, *grads):
        assert m.grad.dtype == torch.float32
        torch.testing.assert_close(m.grad, g1 + g2, rtol=0, atol=0)
    with torch.no_grad():
        for m, _ in bf16.pairs:
            m.add_(torch.randn_like(m) * 1e-2)
    bf16.weights_from_master()
    assert all(torch.equal(c, m.to(torch.bfloat16)) for m, c in bf16.pairs)


@pytest.mark.parametrize("sharding,dtype", [("ddp", "float32"), ("fsdp", "float32"), ("ddp", "bfloat16")])
def test_two_processes_match_one_process(tmp_path, sharding, dtype):
    """torchrun with 2 processes (DDP, or FSDP2 with --fsdp) follows the
    one-process run; with FSDP2 the run is then extended by 2 steps, resuming
    from its gathered checkpoint, and still follows the one-process run. In
    bfloat16 DDP averages the bfloat16 copy's gradients in bfloat16, so the
    two runs agree to bfloat16's precision rather than float32's."""
    common = ["--steps", "6", "--batch-size", "8", "--seq-len", "32", "--eval-every", "3", "--eval-batches", "1",
              "--data-fraction", "0.02", "--log-every", "1", "--quiet", "--set", "num_layers=2", "hidden_size=32",
              "num_heads=4", "dropout=0.0", "attention_dropout=0.0", "--dtype", dtype]
    # (loss, weights). Measured in bfloat16: 4.6e-5 and 6.0e-4; with the
    # copy left out of DDP (each process on its own half of the batch),
    # 4.1e-3 and 1.3e-3: the losses tell the two apart.
    loss_tolerance, weight_tolerance = (1e-4, 1e-4) if dtype == "float32" else (5e-4, 2e-3)
    model = os.path.join(ROOT, "models", "gpt-kjv")
    flags = ["--fsdp"] if sharding == "fsdp" else []
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), OMP_NUM_THREADS="1")
    losses = lambda run: [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                          if "train_loss" in r]

    def both(steps):
        one = _cli("pretrain", model, "--out", str(tmp_path / "one"), *common, "--steps", str(steps))
        assert one.wait(timeout=300) == 0, one.stderr.read()
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "attnzoo", "pretrain", model, "--out", str(tmp_path / "two"), *common,
                              "--steps", str(steps), *flags],
                             env=env, capture_output=True, text=True, timeout=300)
        assert two.returncode == 0, two.stderr[-4000:]
        a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
        assert len(a) == len(b) == steps
        assert max(abs(x - y) for x, y in zip(a, b)) < loss_tolerance, (a, b)
        wa, wb = weights(tmp_path / "one" / "last"), weights(tmp_path / "two" / "last")
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < weight_tolerance

    both(6)
    if sharding == "fsdp":
        both(8)  # both resume from step 6


def test_rerunning_into_a_run_of_another_configuration_is_refused(tmp_path):
    """The same call resumes (and may extend the steps); another model config,
    model directory or training option names the differences instead of
    silently continuing the old run, and overwrite starts over."""
    gpt_kjv, run = os.path.join(ROOT, "models", "gpt-kjv"), tmp_path / "run"
    pretrain(gpt_kjv, str(run), tiny(steps=6), model_overrides=TINY_TEXT, quiet=True)
    checkpoints = sorted(os.listdir(run / "checkpoints"))
    for call, message in [
        (lambda: pretrain(gpt_kjv, str(run), tiny(steps=6), model_overrides={**TINY_TEXT, "num_heads": 2}),
         "model num_heads is 4 there, 2 here"),
        (lambda: pretrain(gpt_kjv, str(run), tiny(steps=6, batch_size=8), model_overrides=TINY_TEXT),
         "option batch_size is 4 there, 8 here"),
        (lambda: pretrain(gpt_kjv, str(run), tiny(steps=6), model_overrides=TINY_TEXT, attention="rotary"),
         'model attention is {"kind": "dense"} there, {"kind": "rotary", "rotary_base": 10000.0, "rotary_dim": 0} '
         "here"),
        (lambda: pretrain(os.path.join(ROOT, "models", "bert-kjv"), str(run), tiny(steps=6),
                          model_overrides={**TINY_TEXT, "vocab_size": 512}),
         'model model_type is "gpt" there, "bert" here'),
    ]:
        with pytest.raises(ValueError, match=re.escape(message) + r".*pass --overwrite to start it over"):
            call()
        assert sorted(os.listdir(run / "checkpoints")) == checkpoints  # nothing was touched
    pretrain(gpt_kjv, str(run), tiny(steps=8), model_overrides=TINY_TEXT, quiet=True)  # extends the same run
    assert json.loads((run / "last" / "trainer_state.json").read_text())["step"] == 8
    pretrain(gpt_kjv, str(run), tiny(steps=4, batch_size=8), model_overrides=TINY_TEXT, quiet=True, overwrite=True)
    assert json.loads((run / "run.json").read_text())["options"]["batch_size"] == 8
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000004"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4 and steps == sorted(steps)  # the old run's records are gone
    p = _cli(*_pretrain_args(run, 4))  # from the command line: one line naming the difference
    assert p.wait(timeout=300) == 1
    error = p.stderr.read()
    assert error.startswith("attnzoo pretrain: ") and "option batch_size is 8 there, 4 here" in error, error


def test_a_warm_up_longer_than_the_run_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match=r"warmup_steps \(10\) >= steps \(4\): the learning rate never leaves "
                                         r"warm-up \(it peaks at 0\.0004, not lr = 0\.001\)"):
        pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(tmp_path / "run"), tiny(steps=4, warmup_steps=10),
                 model_overrides=TINY_TEXT, quiet=True)
    args = [a if a != "3" else "50" for a in _pretrain_args(tmp_path / "cli", 2)]  # warm-up 50, as gpt-kjv's
    p = _cli(*args)
    assert p.wait(timeout=300) == 0
    assert "attnzoo pretrain: warning: warmup_steps (50) >= steps (2)" in p.stderr.read()


def test_evaluate_never_writes_into_a_checkpoint_directory(tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(run), tiny(steps=2, eval_every=2, warmup_steps=1),
             model_overrides=TINY_TEXT, quiet=True)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(run / "last", checkpoint)
    before = sorted(os.listdir(checkpoint))
    evaluate(str(checkpoint), "test", max_batches=1, sample_tokens=0)
    assert sorted(os.listdir(checkpoint)) == before
    assert "nothing written; --out FILE saves the metrics" in capsys.readouterr().out
    evaluate(str(checkpoint), "test", out=str(tmp_path / "metrics.json"), max_batches=1, sample_tokens=0, quiet=True)
    assert json.loads((tmp_path / "metrics.json").read_text())["split"] == "test"
    assert sorted(os.listdir(checkpoint)) == before


def test_unwritable_output_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError, match="not writable"):
        pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(blocker / "run"), tiny(), model_overrides=TINY_TEXT,
                 quiet=True)
    assert not (blocker.parent / "run").exists()


@pytest.mark.parametrize("options,match", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(lr=-1.0), "lr > 0"),
    (dict(data_fraction=0.0), "data_fraction"),
    (dict(batch_size=6, grad_accum=4), "divisible by grad_accum"),
    (dict(seq_len=10_000), "exceeds the model's max_position_embeddings"),
    (dict(mask_prob=0.0), "mask_prob must be in"),
    (dict(mask_prob=1.0), "mask_prob must be in"),
    (dict(mask_prob=0.4), "mask_prob is a bert training option"),
    (dict(dtype="float16"), "dtype must be one of float32, bfloat16"),
])
def test_bad_training_options(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(tmp_path / "run"), tiny(**options),
                 model_overrides=TINY_TEXT, quiet=True)


def test_bert_training_mask_rate_leaves_evaluation_at_15_percent():
    from attnzoo.tasks import BertTask
    config = attnzoo.models.load_config(os.path.join(ROOT, "models", "bert-kjv"), **TINY_TEXT, vocab_size=512)
    standard = BertTask(config, seq_len=128, data_fraction=0.05)
    heavy = BertTask(config, seq_len=128, data_fraction=0.05, tokenizer=standard.tokenizer, train_mask_prob=0.4)

    def masked_fraction(task):
        inputs, labels = task.batch(torch.Generator().manual_seed(3), 64)
        return (labels[:, 1:] != -100).float().mean().item()  # position 0 is [CLS], never masked

    assert abs(masked_fraction(standard) - 0.15) < 0.01
    assert abs(masked_fraction(heavy) - 0.40) < 0.015
    torch.manual_seed(0)
    model = attnzoo.models.Bert(config).eval()
    assert standard.evaluate(model, "val", 2, 8) == heavy.evaluate(model, "val", 2, 8)
    assert 0.13 < heavy.evaluate(model, "val", 2, 8)["masked_tokens"] / (16 * 127) < 0.17


def test_cli_errors_are_one_line(tmp_path):
    p = _cli("evaluate", str(tmp_path))
    assert p.wait(timeout=60) == 1
    assert "neither a run" in p.stderr.read()


def test_kjv_splits_are_deterministic_and_disjoint():
    text = data.kjv()
    # Chapter i goes to val when i % 20 == 0, to test when i % 20 == 1: Genesis 1 and 2, then train from Genesis 3.
    assert text["val"].startswith("In the beginning God created the heaven and the earth.")
    assert text["test"].startswith("Thus the heavens and the earth were finished")
    assert text["train"].startswith("Now the serpent was more subtil")
    assert sum(len(t) for t in text.values()) > 4_000_000
    assert not set(text["val"].splitlines()[:50]) & set(text["train"].splitlines()[:2000]) - {""}


def test_model_directories_carry_their_training_options(tmp_path):
    from attnzoo.train import recommended_options
    for name in os.listdir(os.path.join(ROOT, "models")):
        options = recommended_options(os.path.join(ROOT, "models", name))  # every train.json parses
        options.validate()
    assert recommended_options(os.path.join(ROOT, "models", "gpt-kjv")).steps == 1000
    assert recommended_options(os.path.join(ROOT, "models", "gpt-kjv", "config.json")).lr == 2e-3
    assert recommended_options(str(tmp_path)) == TrainOptions()
    (tmp_path / "train.json").write_text('{"stepz": 3}')
    with pytest.raises(ValueError, match="unknown training options stepz"):
        recommended_options(str(tmp_path))


def test_compare_runs_every_kind_on_the_same_batches(tmp_path):
    from attnzoo.compare import compare
    rows = compare(os.path.join(ROOT, "models", "gpt-kjv"), str(tmp_path), ["dense", "rotary", "lsh"],
                   tiny(steps=4), model_overrides=TINY_TEXT, quiet=True)
    assert [r["kind"] for r in rows] == ["dense", "rotary", "lsh"]
    assert all(r["val_loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert len({r["val_loss"] for r in rows}) == 3  # the kinds really differ
    table = (tmp_path / "compare.md").read_text()
    assert table.count("\n") == 5 and "| lsh |" in table
    runs = [json.loads((tmp_path / k / "run.json").read_text()) for k in ("dense", "lsh")]
    assert runs[0]["options"] == runs[1]["options"]
    assert runs[1]["model"]["attention"]["kind"] == "lsh"


# ---------------------------------------------------------------------------
# Two torchrun "nodes" on this machine (static rendezvous, one process each).

def _multinode_args(out, steps):
    return ["pretrain", os.path.join(ROOT, "models", "gpt-kjv"), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--data-fraction",
            "0.02", "--warmup-steps", "3", "--quiet", "--set", "num_layers=2", "hidden_size=32", "num_heads=4",
            "dropout=0.0", "attention_dropout=0.0"]


def _node(node_rank, port, out, steps, log):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                             f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                             "-m", "attnzoo", *_multinode_args(out, steps)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun starts its workers
    in sessions of their own, so killing its process group is not enough)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_nodes_with_a_node_killed_and_resumed_match_one_process(tmp_path):
    """torchrun --nnodes=2 on 127.0.0.1, one process per node; node 1 is
    SIGKILLed mid-run, node 0 must then stop with an error (not hang), and
    the same two commands resume the run, which ends where one process does."""
    steps = 40
    one = _cli(*_multinode_args(tmp_path / "one", steps))
    assert one.wait(timeout=300) == 0, one.stderr.read()

    run, last = tmp_path / "two", tmp_path / "two" / "last"
    logs = [open(tmp_path / f"node{r}.log", "w") for r in range(2)]
    port = _free_port()
    nodes = [_node(r, port, run, steps, logs[r]) for r in range(2)]
    deadline = time.time() + 180
    while time.time() < deadline and not (last.exists() and os.path.realpath(last).endswith(("10", "12", "14"))):
        time.sleep(0.01)
    _kill_tree(nodes[1].pid)  # node 1 "crashes": its agent and its worker
    nodes[1].wait()
    try:
        survivor = nodes[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_tree(nodes[0].pid)
        pytest.fail("node 0 hung after node 1 was killed:\n" + (tmp_path / "node0.log").read_text()[-3000:])
    assert survivor != 0, "the run ended before node 1 could be killed"
    interrupted_at = json.loads((last / "trainer_state.json").read_text())["step"]
    assert 0 < interrupted_at < steps

    port = _free_port()
    nodes = [_node(r, port, run, steps, logs[r]) for r in range(2)]
    for r, node in enumerate(nodes):
        assert node.wait(timeout=300) == 0, (tmp_path / f"node{r}.log").read_text()[-3000:]
    for log in logs:
        log.close()
    a, b = weights(tmp_path / "one" / "last"), weights(run / "last")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    metrics = lambda r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    val = lambda r: [(m["step"], m["val_loss"]) for m in metrics(r) if "val_loss" in m]  # noqa: E731
    va, vb = val(tmp_path / "one"), val(run)
    assert [s for s, _ in va] == [s for s, _ in vb]
    assert max(abs(x - y) for (_, x), (_, y) in zip(va, vb)) < 1e-4


def test_the_curriculum_grows_windows_and_keeps_characters_per_step():
    from attnzoo.train import curriculum
    o = TrainOptions(steps=12, batch_size=2, seq_len=64, seq_len_start=8)
    schedule = [curriculum(step, o, 64) for step in range(12)]
    # Stages 8, 16, 32 share the first 6 steps; 64 for the last 6.
    assert schedule == [(8, 16)] * 2 + [(16, 8)] * 2 + [(32, 4)] * 2 + [(64, 2)] * 6
    assert all(length * windows == 128 for length, windows in schedule)
    assert curriculum(0, TrainOptions(steps=12, batch_size=2), 64) == (64, 2)  # off by default


def test_a_curriculum_run_draws_the_scheduled_windows(tmp_path, monkeypatch):
    """pretrain asks the task for the curriculum's (windows, length) at each
    step (resuming needs nothing more: the schedule is a function of the step,
    the data generator's state is checkpointed as before)."""
    from attnzoo.tasks import GPTTask
    drawn, batch = [], GPTTask.batch

    def recording(self, generator, batch_size, length=None):
        out = batch(self, generator, batch_size, length)
        drawn.append(tuple(out[0].shape))
        return out
    monkeypatch.setattr(GPTTask, "batch", recording)
    options = tiny(steps=8, eval_every=4, seq_len=32, seq_len_start=8)
    final = pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(tmp_path / "run"), options,
                     model_overrides=TINY_TEXT, quiet=True)
    # (windows, length + 1): 8 and 16 share the first 4 steps, then 32.
    assert drawn == [(16, 9)] * 2 + [(8, 17)] * 2 + [(4, 33)] * 4
    assert math.isfinite(final["loss"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["options"]["seq_len_start"] == 8


def test_the_curriculum_is_refused_where_it_does_not_apply(tmp_path):
    with pytest.raises(ValueError, match="must be below seq_len"):
        pretrain(os.path.join(ROOT, "models", "gpt-kjv"), str(tmp_path / "a"), tiny(seq_len=32, seq_len_start=32),
                 model_overrides=TINY_TEXT, quiet=True)
    with pytest.raises(ValueError, match="GPT training option"):
        pretrain(os.path.join(ROOT, "models", "bert-kjv"), str(tmp_path / "b"), tiny(seq_len=32, seq_len_start=8),
                 model_overrides={**TINY_TEXT, "vocab_size": 512}, quiet=True)
