"""tools/bench cuda: attnzoo's CUDA kernels beside their GPU peers, in one run.

    tools/bench cuda [--n 2048 8192] [--out DIR] [--sections dense causal t5 alibi window]

bfloat16, B=1, H=16, D=64; forward and forward+backward, median of
triton.testing.do_bench. Peers: torch SDPA's flash and memory-efficient
backends, FlexAttention compiled with the equivalent score_mod / block mask,
and SDPA with a materialised bias or mask where the kind needs one (skipped
where that Nq x Nk tensor would not fit). Writes bench_cuda.json and
bench_cuda.png. Run by tools/device-check with the GPU machine's own python3.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
from attnzoo import ops  # noqa: E402

B, H, D = 1, 16, 64
WINDOW = 256
BIAS_BYTES_LIMIT = 8 << 30  # a materialised (B, H, N, N) bias above this is skipped


def contenders(section, N, dtype):
    """name -> (fn(q, k, v, extra) returning out, extra tensors needing grads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    causal = section in ("causal", "alibi", "window")
    table = torch.randn(32, H, device=dev, dtype=torch.float32, requires_grad=True)
    buckets = ops.t5_relative_bucket(torch.arange(1 - N, N)).to(dev)
    slopes = ops.alibi_slopes(H).to(dev)

    def sdpa(backend, **kw):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **kw)
        return run

    out = {}
    if section in ("dense", "causal"):
        out["attnzoo"] = (lambda q, k, v: ops.attention(q, k, v, causal=causal), [])
        out["sdpa-flash"] = (sdpa(SDPBackend.FLASH_ATTENTION, is_causal=causal), [])
        out["sdpa-efficient"] = (sdpa(SDPBackend.EFFICIENT_ATTENTION, is_causal=causal), [])
        mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, N, N) if causal else None
        out["flex"] = (lambda q, k, v: flex(q, k, v, block_mask=mask), [])
    elif section == "t5":
        out["attnzoo"] = (lambda q, k, v: ops.attention(q, k, v, t5_table=table, scale=1.0), [table])

        def t5_mod(score, b, h, i, j):
            return score + table[buckets[j - i + N - 1], h].to(score.dtype)
        out["flex"] = (lambda q, k, v: flex(q, k, v, score_mod=t5_mod, scale=1.0), [table])
        if B * H * N * N * 2 <= BIAS_BYTES_LIMIT:
            def sdpa_bias(q, k, v):
                idx = buckets[(torch.arange(N, device=dev)[None, :] - torch.arange(N, device=dev)[:, None]) + N - 1]
                bias = table[idx].permute(2, 0, 1).unsqueeze(0).to(q.dtype)
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            out["sdpa-bias"] = (sdpa_bias, [table])
    elif section == "alibi":
        out["attnzoo"] = (lambda q, k, v: ops.attention(q, k, v, alibi_slopes=slopes, causal=True), [])

        def alibi_mod(score, b, h, i, j):
            return score - (slopes[h] * (i - j).abs()).to(score.dtype)
        mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, N, N)
        out["flex"] = (lambda q, k, v: flex(q, k, v, score_mod=alibi_mod, block_mask=mask), [])
        if B * H * N * N * 2 <= BIAS_BYTES_LIMIT:
            def sdpa_alibi(q, k, v):
                i = torch.arange(N, device=dev)
                dist = (i[:, None] - i[None, :]).abs()
                bias = (-slopes.view(H, 1, 1) * dist).masked_fill(i[None, :] > i[:, None], float("-inf"))
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
            out["sdpa-bias"] = (sdpa_alibi, [])
    elif section == "window":
        out["attnzoo"] = (lambda q, k, v: ops.attention(q, k, v, causal=True, window=(WINDOW, 0)), [])
        mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j <= WINDOW), None, None, N, N)
        out["flex"] = (lambda q, k, v: flex(q, k, v, block_mask=mask), [])
        if N * N <= BIAS_BYTES_LIMIT:
            i = torch.arange(N, device=dev)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= WINDOW)
            out["sdpa-mask"] = (sdpa(SDPBackend.EFFICIENT_ATTENTION, attn_mask=band), [])
    return out


def measure(fn, extra, q, k, v, backward):
    from triton.testing import do_bench

    if not backward:
        def step():
            with torch.no_grad():
                fn(q, k, v)
    else:
        leaves = [q, k, v] + extra
        grad = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)

        def step():
            out = fn(q, k, v)
            torch.autograd.grad(out, leaves, grad)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(step, warmup=10, rep=60, return_mode="median")
    return ms, torch.cuda.max_memory_allocated() - base


def flops(section, N, backward):
    f = 4 * B * H * N * N * D
    if section in ("causal", "alibi"):
        f /= 2
    if section == "window":
        f = 4 * B * H * N * (WINDOW + 1) * D
    return f * (3.5 if backward else 1.0)


def main(argv):
    ap = argparse.ArgumentParser(prog="tools/bench cuda")
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    ap.add_argument("--sections", nargs="+", default=["dense", "causal", "t5", "alibi", "window"])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tools/bench cuda: no CUDA device")
    dtype = torch.bfloat16
    rows = []
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype="bfloat16", B=B, H=H, D=D)

    def save():  # after every case, so that a run cut short keeps what it measured
        with open(os.path.join(args.out, "bench_cuda.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bfloat16, B={B} H={H} D={D}")
    print(f"{'section':8} {'N':>6} {'pass':8} {'contender':15} {'ms':>9} {'TFLOP/s':>8} {'peak MiB':>9} "
          f"{'attnzoo speed':>13}")
    for section in args.sections:
        for N in args.n:
            g = torch.Generator(device="cuda").manual_seed(N)
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
                       for _ in range(3))
            for backward in (False, True):
                times = {}
                for name, (fn, extra) in contenders(section, N, dtype).items():
                    t0 = time.time()
                    try:
                        ms, mem = measure(fn, extra, q, k, v, backward)
                    except Exception as e:  # a peer that cannot run this case: recorded, not fatal
                        rows.append(dict(section=section, N=N, backward=backward, contender=name,
                                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                        print(f"{section:8} {N:6} {'fwd+bwd' if backward else 'fwd':8} {name:15} failed: "
                              f"{rows[-1]['error'][:80]}", flush=True)
                        continue
                    times[name] = ms
                    tflops = flops(section, N, backward) / (ms * 1e-3) / 1e12
                    rows.append(dict(section=section, N=N, backward=backward, contender=name, ms=ms,
                                     tflops=tflops, peak_bytes=mem, wall_s=time.time() - t0))
                for r in rows:
                    if r["section"] == section and r["N"] == N and r["backward"] == backward and "ms" in r:
                        r["attnzoo_speed"] = r["ms"] / times["attnzoo"] if "attnzoo" in times else math.nan
                        print(f"{section:8} {N:6} {'fwd+bwd' if backward else 'fwd':8} {r['contender']:15} "
                              f"{r['ms']:9.3f} {r['tflops']:8.1f} {r['peak_bytes'] / 2**20:9.0f} "
                              f"{r['attnzoo_speed']:12.2f}x", flush=True)
                save()
            del q, k, v
            torch.cuda.empty_cache()
    plot(rows, os.path.join(args.out, "bench_cuda.png"), meta)


def plot(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = sorted({r["section"] for r in rows}, key=[r["section"] for r in rows].index)
    fig, axes = plt.subplots(2, len(sections), figsize=(4 * len(sections), 7), squeeze=False)
    for col, section in enumerate(sections):
        for row, backward in enumerate((False, True)):
            ax = axes[row][col]
            pts = [r for r in rows if r["section"] == section and r["backward"] == backward and "ms" in r]
            for name in sorted({r["contender"] for r in pts}):
                mine = sorted((r["N"], r["tflops"]) for r in pts if r["contender"] == name)
                ax.plot([n for n, _ in mine], [t for _, t in mine], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{section}, {'fwd+bwd' if backward else 'fwd'}")
            ax.set_xlabel("N")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']}, torch {meta['torch']}, bfloat16, B={meta['B']} H={meta['H']} D={meta['D']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1:])
