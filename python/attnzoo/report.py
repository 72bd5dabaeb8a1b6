"""python -m attnzoo report: the zoo on one static HTML page.

    tools/attnzoo report --out site/ [--models models] [--runs runs] [--docs docs]

Reads what is committed (each model directory's config.json and
results.json, the attention-kind comparisons under models/*/compare, the
benchmark plots docs/bench*.png) and the run folders that exist (their loss.png
and any other PNG: attention maps, context-use curves, alignments), and
writes site/index.html with every image beside it in site/assets/. Nothing
is fetched at view time: the page opens from the file system. A section with
nothing to show says so instead of disappearing.

The page marks itself when loaded: <body data-ready="1"
data-images-total="N" data-images-broken="...">, which the test reads
from headless Chromium's DOM.
"""
import datetime
import glob
import html
import json
import os
import shutil
import subprocess
from typing import List, Optional

from .models import MODEL_CLASSES, load_config

# Which test metric is a model's headline, in order of preference: (key, label, format).
HEADLINE_METRICS = [("accuracy", "test accuracy", "{:.2%}"), ("masked_accuracy", "test masked accuracy", "{:.2%}"),
                    ("cer", "test CER", "{:.2%}"), ("loss", "test loss (nats/char)", "{:.4f}")]

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.met { color: #1a7f37; font-weight: 600; } .missed { color: #c62828; font-weight: 600; } .none { color: #888; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 560px; }
figure img { max-width: 100%; border: 1px solid #ddd; } figcaption { font-size: 0.85em; color: #555; }
.note { color: #666; font-style: italic; }
"""

# Marks the body once every image has loaded or failed (read by tests/python/test_report.py).
LOAD_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesBroken = broken.join(" ");
  document.body.dataset.ready = "1";
});
"""


def _esc(x) -> str:
    return html.escape(str(x))


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _parameters(model_dir: str, results: dict) -> Optional[int]:
    """The count results.json records, else that of the model its config builds."""
    if "parameters" in results:
        return int(results["parameters"])
    try:
        config = load_config(model_dir)
        model = MODEL_CLASSES[config["model_type"]](config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # a config this build cannot make: the cell says so
        return None


def _kind(config: dict) -> str:
    def kinds(att) -> str:
        if isinstance(att, list):  # per layer
            return " / ".join(dict.fromkeys(a.get("kind", "dense") for a in att))
        return att.get("kind", "dense")

    text = kinds(config.get("attention", {}))
    if "decoder_attention" in config or "cross_attention" in config:  # an encoder-decoder
        text += (f"; decoder {kinds(config.get('decoder_attention', {}))}, "
                 f"cross-attention {kinds(config.get('cross_attention', {}))}")
    return text


def _headline(results: dict) -> str:
    test = results.get("test") or {}
    for key, label, fmt in HEADLINE_METRICS:
        if key in test:
            return f"{label}: {fmt.format(test[key])}"
    return "—"


def _bound(key: str, value) -> str:
    """results.json's target keys ("test_accuracy_at_least": 0.97, "within_s": 1800) as text."""
    if key == "within_s":
        return f"within {value} s"
    for suffix, sign in (("_at_most", "≤"), ("_at_least", "≥")):
        if key.endswith(suffix):
            return f"{key[:-len(suffix)].replace('_', ' ')} {sign} {value}"
    return f"{key.replace('_', ' ')} {value}"


def _target(results: dict) -> str:
    target = results.get("target")
    if not target:
        return '<span class="none">none set</span>'
    what = ", ".join(_bound(k, v) for k, v in target.items() if k != "met")
    met = target.get("met")
    mark = '<span class="met">met</span>' if met else '<span class="missed">missed</span>'
    return f"{_esc(what)}: {mark}"


class Page:
    """The HTML body, section by section, and the assets copied beside it."""

    def __init__(self, out: str):
        self.out, self.parts = out, []
        self.assets = os.path.join(out, "assets")
        os.makedirs(self.assets, exist_ok=True)

    def add(self, text: str):
        self.parts.append(text)

    def asset(self, src: str, name: str) -> str:
        """Copies src into assets/ under a unique name; returns the relative path."""
        name = name.replace(os.sep, "-")
        shutil.copyfile(src, os.path.join(self.assets, name))
        return f"assets/{name}"

    def figure(self, src: str, name: str, caption: str) -> str:
        return (f'<figure><img src="{_esc(self.asset(src, name))}" alt="{_esc(caption)}" loading="eager">'
                f"<figcaption>{_esc(caption)}</figcaption></figure>")

    def write(self, title: str, subtitle: str) -> str:
        body = "\n".join(self.parts)
        doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
               f"<style>{CSS}</style><script>{LOAD_SCRIPT}</script></head>\n<body>\n<h1>{_esc(title)}</h1>"
               f'<p class="sub">{_esc(subtitle)}</p>\n{body}\n</body></html>\n')
        path = os.path.join(self.out, "index.html")
        with open(path, "w") as f:
            f.write(doc)
        return path


def _zoo_table(page: Page, model_dirs: List[str]):
    page.add("<h2>The zoo</h2>")
    rows = []
    for d in model_dirs:
        results = _read_json(os.path.join(d, "results.json")) or {}
        config = _read_json(os.path.join(d, "config.json")) or {}
        params = _parameters(d, results)
        wall = results.get("wall_time_s")
        rows.append(
            f'<tr class="model"><td>{_esc(os.path.basename(d))}</td><td>{_esc(_kind(config))}</td>'
            f'<td class="num">{"—" if params is None else f"{params / 1e6:.2f} M"}</td>'
            f'<td class="num">{"—" if wall is None else f"{wall / 60:.1f} min"}</td>'
            f"<td>{_esc(results.get('machine', '—'))}</td><td>{_esc(_headline(results))}</td>"
            f"<td>{_target(results)}</td></tr>")
    page.add("<table><tr><th>model</th><th>attention</th><th>parameters</th><th>training wall time</th>"
             "<th>machine</th><th>held-out metric</th><th>target</th></tr>" + "".join(rows) + "</table>")


def _comparisons(page: Page, model_dirs: List[str]):
    page.add("<h2>Attention kinds compared</h2>")
    found = False
    for d in model_dirs:
        for path in sorted(glob.glob(os.path.join(d, "compare", "*.json"))):
            data = _read_json(path)
            if not data or not data.get("rows"):
                continue
            found = True
            rows = "".join(
                f"<tr><td>{_esc(r.get('kind'))}</td><td class='num'>{r.get('val_loss', float('nan')):.4f}</td>"
                f"<td class='num'>{r.get('tokens_per_s', float('nan')):.0f}</td></tr>" for r in data["rows"])
            page.add(f"<p>{_esc(data.get('model', os.path.basename(d)))}, equal steps "
                     f"(<code>{_esc(data.get('command', ''))}</code>):</p>"
                     f"<table><tr><th>kind</th><th>validation loss</th><th>training tokens/s</th></tr>{rows}"
                     "</table>")
    if not found:
        page.add('<p class="note">No comparison found under models/*/compare.</p>')


def _validation_curves(page: Page, model_dirs: List[str]):
    """The committed validation curves (results.json), loss against step, one plot per model type
    (their losses are not on one scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    page.add("<h2>Validation curves</h2>")
    by_type = {}
    for d in model_dirs:
        results = _read_json(os.path.join(d, "results.json")) or {}
        points = [(p["step"], p["loss"]) for p in results.get("validation_curve", []) if "loss" in p]
        if points:
            model_type = (_read_json(os.path.join(d, "config.json")) or {}).get("model_type", "model")
            by_type.setdefault(model_type, {})[os.path.basename(d)] = points
    if not by_type:
        page.add('<p class="note">No results.json holds a validation curve.</p>')
        return
    for model_type, curves in sorted(by_type.items()):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, points in curves.items():
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(model_type)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"validation-{model_type}.png"
        fig.savefig(os.path.join(page.assets, name), dpi=90)
        plt.close(fig)
        page.add(f'<figure><img src="assets/{name}" alt="validation curves, {_esc(model_type)}">'
                 f"<figcaption>Validation loss ({_esc(', '.join(curves))}).</figcaption></figure>")


# Which run-folder PNGs go to which section, by file name.
RUN_SECTIONS = [("Loss curves", lambda n: n == "loss.png"),
                ("Context use", lambda n: n.startswith("context")),
                ("Attention maps and alignments", lambda n: n.startswith(("attention", "alignment"))),
                ("Other plots", None)]


def _context_use_table(page: Page, model_dirs: List[str]):
    """The committed context-use measurements (results.json "context_use", evaluate --context-use)."""
    rows = []
    for d in model_dirs:
        results = _read_json(os.path.join(d, "results.json")) or {}
        c, probe = results.get("context_use"), results.get("copy_probe")
        if c:
            verdict = ('<span class="met">uses it</span>' if c["uses_context"]
                       else '<span class="missed">no evidence</span>')
            copies = ("" if not probe else
                      f"{probe['difference']:.4f} ± {probe['standard_error']:.4f} at {probe['distance']}: "
                      + ('<span class="met">copies</span>' if probe["copies"]
                         else '<span class="missed">no copying</span>'))
            rows.append(f"<tr><td>{_esc(os.path.basename(d))}</td><td>{_esc(c['targets'])} of {c['seq_len']}</td>"
                        f"<td class='num'>{c['loss_full_context']:.4f}</td><td class='num'>{c['short']}</td>"
                        f"<td class='num'>{c['loss_short_context']:.4f}</td>"
                        f"<td class='num'>{c['difference']:.4f} ± {c['standard_error']:.4f}</td>"
                        f"<td>{verdict}</td><td>{copies}</td></tr>")
    if rows:
        page.add("<table><tr><th>model</th><th>targets</th><th>loss, whole window</th><th>only the previous</th>"
                 "<th>loss, those only</th><th>difference ± SE</th><th>longer context</th>"
                 "<th>copy probe: first minus second copy ± SE, distance</th></tr>" + "".join(rows) + "</table>")
    else:
        page.add('<p class="note">No results.json holds a context-use measurement.</p>')


def _run_folders(page: Page, runs: Optional[str], model_dirs: List[str]):
    """The PNGs of the run folders and of the model directories (committed plots), by section."""
    folders = sorted(d for d in glob.glob(os.path.join(runs, "*")) if os.path.isdir(d)) if runs else []
    pngs = [(os.path.basename(d), p) for d in folders + model_dirs for p in sorted(glob.glob(os.path.join(d, "*.png")))]
    taken = set()
    for title, wants in RUN_SECTIONS:
        page.add(f"<h2>{_esc(title)}</h2>")
        if title == "Context use":
            _context_use_table(page, model_dirs)
        chosen = [(run, p) for run, p in pngs if p not in taken and (wants is None or wants(os.path.basename(p)))]
        taken.update(p for _, p in chosen)
        if not chosen:
            where = f"in the run folders of {runs}" if folders else "no run folders given or found"
            page.add(f'<p class="note">Nothing to show ({_esc(where)}).</p>')
            continue
        page.add("".join(page.figure(p, f"run-{run}-{os.path.basename(p)}", f"{run}: {os.path.basename(p)}")
                         for run, p in chosen))


def _benchmarks(page: Page, docs: str):
    page.add("<h2>Benchmarks</h2>")
    plots = sorted(glob.glob(os.path.join(docs, "bench*.png")))
    if not plots:
        page.add(f'<p class="note">No benchmark plot in {_esc(docs)}.</p>')
        return
    figures = []
    for p in plots:
        meta = _read_json(os.path.splitext(p)[0] + ".json") or {}
        detail = meta.get("meta", meta) if isinstance(meta, dict) else {}
        machine = detail.get("device") or detail.get("machine") or detail.get("cpu") or ""
        caption = os.path.basename(p) + (f" ({machine})" if isinstance(machine, str) and machine else "")
        figures.append(page.figure(p, "docs-" + os.path.basename(p), caption))
    page.add("".join(figures) + '<p>The numbers behind them: <code>docs/benchmarks.md</code>.</p>')


def _commit(root: str) -> str:
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(out: str, models: str = "models", runs: Optional[str] = "runs", docs: str = "docs") -> str:
    """Writes out/index.html and out/assets/; returns the page's path."""
    model_dirs = sorted(d for d in glob.glob(os.path.join(models, "*"))
                        if os.path.isfile(os.path.join(d, "results.json")))
    if not model_dirs:
        raise ValueError(f"report: no model directory with a results.json under {models}")
    if os.path.isdir(os.path.join(out, "assets")):
        shutil.rmtree(os.path.join(out, "assets"))  # no stale images from an earlier report
    page = Page(out)
    _zoo_table(page, model_dirs)
    _comparisons(page, model_dirs)
    _validation_curves(page, model_dirs)
    _run_folders(page, runs if runs and os.path.isdir(runs) else None, model_dirs)
    _benchmarks(page, docs)
    root = os.path.dirname(os.path.abspath(models))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return page.write("The attnzoo model zoo",
                      f"{len(model_dirs)} models; written {stamp} from commit {_commit(root)} by "
                      "tools/attnzoo report")
