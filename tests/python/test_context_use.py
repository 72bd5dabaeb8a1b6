"""evaluate --context-use: the loss on a window's last targets with the whole
window before them and with only the `short` characters before each; and
the copy probe (a run of shuffled words repeated further back than that)."""
import json
import math

import pytest
import torch

from attnzoo.__main__ import main
from attnzoo.models import GPT
from attnzoo.tasks import GPTTask

SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "dropout": 0.0,
         "attention_dropout": 0.0, "vocab_size": 256, "max_position_embeddings": 64}


def gpt(attention, position_embedding):
    torch.manual_seed(0)
    return GPT({**SMALL, "attention": attention, "position_embedding": position_embedding}).eval()


def task():
    return GPTTask(gpt({"kind": "dense"}, "none").config, seq_len=48, data_fraction=0.02)


def test_a_model_that_cannot_see_far_shows_no_difference():
    """Two layers of a 2-token window and no position embedding see 4
    characters back: with 8 or the whole window before each target, the
    same predictions. A dense model of the same kind does differ."""
    local = task().context_use(gpt({"kind": "local", "window": 2}, "none"), "val", short=8, windows=4)
    assert local["targets"] == "positions 40-47" and local["windows"] == 4
    assert abs(local["difference"]) < 1e-5
    assert not local["uses_context"]
    assert len(local["loss_by_position"]) == 48
    dense = task().context_use(gpt({"kind": "dense"}, "none"), "val", short=8, windows=4)
    assert abs(dense["difference"]) > 1e-4
    assert math.isfinite(dense["standard_error"]) and dense["standard_error"] > 0


def test_the_short_context_loss_is_each_targets_own_forward():
    """loss_short_context against one forward per target, written out."""
    t, model = task(), gpt({"kind": "dense"}, "learned")
    got = t.context_use(model, "val", short=8, windows=2)
    starts = torch.linspace(0, len(t.streams["val"]) - 48 - 2, 2).long()
    losses = []
    for s in starts.tolist():
        x = t.streams["val"][s:s + 49]
        for target in range(40, 48):
            logits = model(x[target + 1 - 8:target + 1].unsqueeze(0))[0, -1]
            losses.append(torch.nn.functional.cross_entropy(logits.unsqueeze(0), x[target + 1].unsqueeze(0)))
    assert got["loss_short_context"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_short_must_be_inside_the_window():
    with pytest.raises(ValueError, match="short must lie in"):
        task().context_use(gpt({"kind": "dense"}, "none"), "val", short=48)


def test_the_command_writes_the_measurement_and_its_plot(tmp_path):
    model = gpt({"kind": "dense"}, "learned")
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eval" / "eval.json"
    assert main(["evaluate", str(tmp_path / "ckpt"), "--max-batches", "1", "--sample-tokens", "0", "--context-use",
                 "--context-short", "16", "--context-windows", "3", "--out", str(out)]) == 0
    with open(out) as f:
        measured = json.load(f)["context_use"]
    assert measured["short"] == 16 and measured["windows"] == 3 and measured["targets"] == "positions 48-63"
    assert (tmp_path / "eval" / "context-use.png").stat().st_size > 0
    with open(out) as f:
        probe = json.load(f)["copy_probe"]
    assert probe["run"] == 16 and probe["distance"] == 48 and probe["windows"] == 3


def copier(distance):
    """A stand-in model that predicts x[t + 1] as x[t + 1 - distance] (and
    knows nothing before that): a perfect copier from exactly that far back."""
    def model(x):
        logits = torch.zeros(*x.shape, 256)
        logits[:, distance - 1:].scatter_(-1, x[:, :x.shape[1] - distance + 1].unsqueeze(-1), 30.0)
        return logits
    return model


def test_the_copy_probe_sees_a_copier_copy_and_a_blind_model_not():
    t = task()
    copied = t.copy_probe(copier(48 - 8), "val", short=8, windows=4)
    assert copied["distance"] == 40 and copied["run"] == 8
    assert copied["loss_second_copy"] < 1e-6 < 1.0 < copied["loss_first_copy"]
    assert copied["copies"]
    # One character off, and the copier predicts the wrong characters.
    assert t.copy_probe(copier(48 - 9), "val", short=8, windows=4)["loss_second_copy"] > 1.0
    blind = t.copy_probe(lambda x: torch.zeros(*x.shape, 256), "val", short=8, windows=4)
    assert blind["difference"] == 0.0 and not blind["copies"]
    # The runs are drawn afresh per window, from a seed: the same runs every time.
    assert t.copy_probe(copier(40), "val", short=8, windows=4) == copied
    with pytest.raises(ValueError, match="short must lie in"):
        t.copy_probe(copier(40), "val", short=25)
