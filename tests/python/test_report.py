"""tools/attnzoo report: the zoo's static page, rendered by headless Chromium.

The page marks its <body> once loaded (data-ready, data-images-total,
data-images-broken: attnzoo/report.py); Chromium's --dump-dom shows the
DOM after its scripts ran. Chromium is the Debian package tools/setup.sh
installs; without it the browser tests skip and say so."""
import glob
import json
import os
import re
import shutil
import subprocess

import pytest

from attnzoo.__main__ import main
from attnzoo.report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = os.path.join(ROOT, "models")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="headless Chromium is not installed (tools/setup.sh installs chromium)")


def zoo_models():
    return sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(MODELS, "*", "results.json")))


def chromium_dom(page):
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", "file://" + os.path.abspath(page)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def body_marks(dom):
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


def fake_runs(tmp_path):
    """Two run folders as pretrain and plot-attention leave them: loss.png, attention.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    for run, files in (("gpt-kjv", ["loss.png", "attention.png"]), ("vit-digits", ["loss.png"])):
        os.makedirs(tmp_path / "runs" / run)
        for name in files:
            fig, ax = plt.subplots(figsize=(3, 2))
            ax.plot([0, 1], [1, 0])
            fig.savefig(tmp_path / "runs" / run / name)
            plt.close(fig)
            names.append(f"{run}/{name}")
    return names


@needs_chromium
def test_the_page_renders_with_every_image_and_a_row_per_model(tmp_path):
    runs = fake_runs(tmp_path)
    page = write_report(str(tmp_path / "site"), MODELS, str(tmp_path / "runs"), os.path.join(ROOT, "docs"))
    with open(page) as f:
        source = f.read()
    dom = chromium_dom(page)
    marks = body_marks(dom)
    assert marks.get("ready") == "1", "the page's load handler did not run"
    assert marks["images-broken"] == "", f"images that did not load: {marks['images-broken']}"
    curves = len({json.load(open(os.path.join(MODELS, m, "config.json")))["model_type"] for m in zoo_models()
                  if "validation_curve" in json.load(open(os.path.join(MODELS, m, "results.json")))})
    committed = len(glob.glob(os.path.join(MODELS, "*", "*.png")))  # plots in the model directories
    expected = len(glob.glob(os.path.join(ROOT, "docs", "bench*.png"))) + len(runs) + curves + committed
    assert int(marks["images-total"]) == expected == source.count("<img ")
    rows = re.findall(r'<tr class="model"><td>([^<]+)</td>', dom)
    assert rows == zoo_models()
    assert "run-gpt-kjv-attention.png" in source  # the attention map, in its section
    # Every asset is beside the page: nothing points outside it.
    assert all(src.startswith("assets/") for src in re.findall(r'<img src="([^"]+)"', source))


@needs_chromium
def test_a_missing_image_is_reported(tmp_path):
    """The check above can fail: an asset removed after writing shows up as broken."""
    page = write_report(str(tmp_path / "site"), MODELS, None, os.path.join(ROOT, "docs"))
    os.remove(tmp_path / "site" / "assets" / "validation-gpt.png")
    marks = body_marks(chromium_dom(page))
    assert marks["images-broken"] == "assets/validation-gpt.png"


def test_the_table_shows_each_models_committed_results(tmp_path):
    page = write_report(str(tmp_path / "site"), MODELS, None, os.path.join(ROOT, "docs"))
    with open(page) as f:
        source = f.read()
    with open(os.path.join(MODELS, "vit-digits", "results.json")) as f:
        vit = json.load(f)
    row = re.search(r'<tr class="model"><td>vit-digits</td>.*?</tr>', source).group(0)
    assert f"test accuracy: {vit['test']['accuracy']:.2%}" in row
    assert f"{vit['wall_time_s'] / 60:.1f} min" in row
    assert '<span class="met">met</span>' in row
    # A section with nothing to show says so.
    assert "no run folders given or found" in source
    with open(os.path.join(MODELS, "gpt-kjv", "results.json")) as f:
        context = json.load(f)["context_use"]
    assert f"{context['difference']:.4f} ± {context['standard_error']:.4f}" in source
    with open(os.path.join(MODELS, "gpt-kjv", "results.json")) as f:
        probe = json.load(f)["copy_probe"]
    assert f"{probe['difference']:.4f} ± {probe['standard_error']:.4f} at 192: " in source
    assert "test masked accuracy ≥ 0.55, within 1800 s" in source


def test_the_command_writes_the_page_and_refuses_an_empty_zoo(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "site"), "--models", MODELS, "--runs",
                 str(tmp_path / "none"), "--docs", os.path.join(ROOT, "docs")]) == 0
    assert os.path.isfile(tmp_path / "site" / "index.html")
    assert main(["report", "--out", str(tmp_path / "site2"), "--models", str(tmp_path)]) == 1
    assert "no model directory with a results.json" in capsys.readouterr().err
