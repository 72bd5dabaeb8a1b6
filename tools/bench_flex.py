"""tools/bench flex: attnzoo.flex_attention with torch's BlockMask beside torch's
own flex_attention compiled by Inductor, on the CPU, in one run.

    tools/bench flex [--n 4096 16384] [--masks causal sliding documents] [--quick] [--out DIR]

float32, B=1, H=8, D=64; one BlockMask per (mask, N), BLOCK_SIZE 128, made by
create_block_mask and handed to both. Contenders:
  attnzoo-flex    attnzoo.flex_attention(q, k, v, block_mask=bm): forward and
                  forward+backward (the plan is built by a warm-up call first;
                  its cost is reported separately)
  torch-flex      torch.compile(flex_attention)(q, k, v, block_mask=bm): forward
                  only (torch has no flex backward on the CPU); compile time
                  reported separately
  attnzoo-native  the same mask as attnzoo's own option where it has one
                  (causal=True, window=(W-1, 0)): what the BlockMask route costs
Outputs of attnzoo-flex and torch-flex are compared at every point (max |diff|).
Writes flex.json and flex.png into --out (default bench-results/).
"""
import argparse
import json
import os
import platform
import time
import warnings

import torch

import attnzoo

B, H, D = 1, 8, 64
BLOCK = 128
WINDOW = 1024


def time_it(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def mask_mod_for(name, N):
    if name == "causal":
        return lambda b, h, q, kv: q >= kv
    if name == "sliding":
        return lambda b, h, q, kv: (q >= kv) & (q - kv < WINDOW)
    if name == "documents":  # causal within documents of 256 to 2048 tokens
        g = torch.Generator().manual_seed(N)
        lengths = torch.randint(256, 2049, (N // 256 + 1,), generator=g)
        doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:N]
        return lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)
    raise ValueError(name)


def native_for(name):
    if name == "causal":
        return lambda q, k, v: attnzoo.attention(q, k, v, causal=True)
    if name == "sliding":
        return lambda q, k, v: attnzoo.attention(q, k, v, causal=True, window=(WINDOW - 1, 0))
    return None


def measure(mask, N, repeats):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compilation per point: one compiled function shared across masks
    # and sizes recompiles per mask_mod and size, and past Dynamo's recompile
    # limit silently runs torch's eager (dense) flex path instead.
    torch._dynamo.reset()
    torch_flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    bm = create_block_mask(mask_mod_for(mask, N), None, None, N, N, device="cpu", BLOCK_SIZE=BLOCK)
    row = {"mask": mask, "N": N, "density": 1.0 - bm.sparsity() / 100}

    t0 = time.perf_counter()
    attnzoo.flex.block_mask_plan(bm, B, H, N, N)
    row["attnzoo_plan_s"] = time.perf_counter() - t0
    ours = attnzoo.flex_attention(q, k, v, block_mask=bm)
    row["attnzoo-flex_fwd_s"] = time_it(lambda: attnzoo.flex_attention(q, k, v, block_mask=bm), repeats)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def fwd_bwd():
        attnzoo.flex_attention(qg, kg, vg, block_mask=bm).sum().backward()
        qg.grad = kg.grad = vg.grad = None
    row["attnzoo-flex_fwd_bwd_s"] = time_it(fwd_bwd, repeats)

    native = native_for(mask)
    if native is not None:
        row["attnzoo-native_fwd_s"] = time_it(lambda: native(q, k, v), repeats)
        row["native_max_diff"] = float((native(q, k, v) - ours).abs().max())

    t0 = time.perf_counter()
    theirs = torch_flex(q, k, v, block_mask=bm)
    row["torch-flex_compile_s"] = time.perf_counter() - t0
    row["torch-flex_fwd_s"] = time_it(lambda: torch_flex(q, k, v, block_mask=bm), repeats)
    row["max_diff_vs_torch_flex"] = float((theirs - ours).abs().max())
    try:  # eager: the compiled function reports the same refusal as an opaque Dynamo error
        flex_attention(qg, kg, vg, block_mask=bm).sum().backward()
        row["torch-flex_backward"] = "runs"
    except Exception as error:  # torch 2.15: NotImplementedError on the CPU
        row["torch-flex_backward"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    row["fwd_vs_torch_flex"] = row["torch-flex_fwd_s"] / row["attnzoo-flex_fwd_s"]
    return row


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = list(dict.fromkeys(r["mask"] for r in rows))
    fig, axes = plt.subplots(1, len(masks), figsize=(4.2 * len(masks), 3.6), squeeze=False)
    for ax, mask in zip(axes[0], masks):
        rs = [r for r in rows if r["mask"] == mask]
        ns = [r["N"] for r in rs]
        for key, label in (("attnzoo-flex_fwd_s", "attnzoo forward"),
                           ("torch-flex_fwd_s", "torch flex (compiled) forward"),
                           ("attnzoo-flex_fwd_bwd_s", "attnzoo forward+backward"),
                           ("attnzoo-native_fwd_s", "attnzoo native option, forward")):
            if all(key in r for r in rs):
                ax.plot(ns, [r[key] * 1e3 for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{mask} BlockMask")
        ax.set_xlabel("N")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"FlexAttention BlockMask, CPU float32, B={B} H={H} D={D}, BLOCK_SIZE {BLOCK}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv):
    ap = argparse.ArgumentParser(prog="tools/bench flex", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+")
    ap.add_argument("--masks", nargs="+", default=["causal", "sliding", "documents"],
                    choices=["causal", "sliding", "documents"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "bench-results"))
    args = ap.parse_args(argv)
    sizes = args.n or ([1024, 2048] if args.quick else [4096, 16384])
    repeats = 1 if args.quick else args.repeats
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    print(f"attnzoo {attnzoo.__version__} engine={attnzoo.engine_isa()} torch {torch.__version__} "
          f"threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()}; "
          f"float32 B={B} H={H} D={D}, BLOCK_SIZE {BLOCK}, median of {repeats}", flush=True)
    print(f"{'mask':10s} {'N':>6s} {'dens':>5s} {'plan ms':>8s} {'ours fwd':>9s} {'flex fwd':>9s} {'ratio':>6s} "
          f"{'ours f+b':>9s} {'native':>8s} {'|diff|':>8s}  torch flex backward", flush=True)
    rows = []
    for mask in args.masks:
        for N in sizes:
            r = measure(mask, N, repeats)
            rows.append(r)
            native = f"{r['attnzoo-native_fwd_s'] * 1e3:8.1f}" if "attnzoo-native_fwd_s" in r else f"{'-':>8s}"
            print(f"{mask:10s} {N:6d} {r['density']:5.2f} {r['attnzoo_plan_s'] * 1e3:8.1f} "
                  f"{r['attnzoo-flex_fwd_s'] * 1e3:9.1f} {r['torch-flex_fwd_s'] * 1e3:9.1f} "
                  f"{r['fwd_vs_torch_flex']:6.2f} {r['attnzoo-flex_fwd_bwd_s'] * 1e3:9.1f} {native} "
                  f"{r['max_diff_vs_torch_flex']:8.1e}  {r['torch-flex_backward']}", flush=True)
    print("(ms; ratio = torch flex forward time / attnzoo forward time, > 1 means attnzoo is faster; "
          "torch compile times: " + ", ".join(f"{r['torch-flex_compile_s']:.0f}s" for r in rows) + ")")
    os.makedirs(args.out, exist_ok=True)
    result = {"suite": "flex", "machine": {"cpu": platform.processor() or platform.machine(),
                                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                                           "engine": attnzoo.engine_isa()},
              "shape": {"B": B, "H": H, "D": D, "dtype": "float32", "BLOCK_SIZE": BLOCK, "window": WINDOW},
              "rows": rows}
    json_path, png_path = os.path.join(args.out, "flex.json"), os.path.join(args.out, "flex.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, png_path)
    print(f"wrote {json_path} and {png_path}")
