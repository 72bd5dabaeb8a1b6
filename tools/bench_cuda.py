"""tools/bench cuda: attnzoo's CUDA kernels beside their GPU peers, in one run.

    tools/bench cuda [--n 2048 8192] [--out DIR] [--name bench_cuda] [--time-limit S]
                     [--sections dense causal t5 alibi window local bigbird longformer shaw lsh linformer linear]
                     [--long]

A section may carry its own sizes, ``lsh@16384`` or ``local@4096,16384``;
the others take ``--n`` (default: 1024 ... 32768 for the dense family,
4096 16384 32768 for the newer sections, 65536 added with ``--long``).

bfloat16, B=1, H=16, D=64; forward and forward+backward, median of
triton.testing.do_bench, peak memory above the inputs. Sections and peers:

- dense, causal, t5, alibi, window: torch SDPA's flash and memory-efficient
  backends, FlexAttention compiled with the equivalent score_mod / block
  mask, and SDPA with a materialised bias or mask where the kind needs one
  (skipped where that Nq x Nk tensor would not fit).
- local (layout_local(n, n, 1)), bigbird (window 1, 1 global, 2 random
  blocks per head): block_sparse_attention with blocks of 64 vs compiled
  FlexAttention given the same blocks (BLOCK_SIZE=64, a mask_mod that looks
  the layout up at block granularity, every block full).
- longformer (window 256, 2 global tokens): longformer_attention vs compiled
  FlexAttention with the token-exact mask_mod.
- shaw (rel_k and rel_v, K=64): vs dense attnzoo attention at the same N
  (the target: Shaw within 1.3x of dense), SDPA given q @ rel_k^T gathered as
  a bias (rel_k only: rel_v needs the probabilities) and the full PyTorch
  composite, where their N x N tensors fit.
- lsh (bucket 64, 4 hashes, N/64 buckets, shared qk): vs reformer-pytorch's
  LSHAttention on the GPU over (B*H, N, D) (its own random rotations; the
  target at N=16384: at least 20x its speed with at most 1/10 of its peak
  memory).
- linformer (projection to 256): vs lucidrains' LinformerSelfAttention
  (its projections made identities, so only the attention runs) and SDPA
  over the projected keys.
- linear (causal, elu+1): vs a plain PyTorch chunked causal linear attention
  (exact, the same maths) and lucidrains' causal_linear_attn
  (linear-attention-transformer: softmax feature maps, its own
  approximation; timing only).

A peer that cannot be imported or run is recorded as an error row. Each
row's rel_diff is the contender's forward output against attnzoo's (max
difference over the largest entry), NaN where the peer computes something
else. TFLOP/s comes from a per-section estimate of the useful work
(flops()). At the end: the block-sparse sections' growth per doubling of N
(time(2N) / time(N): 2 is linear) and the issue's targets. Writes
NAME.json and NAME.png. Run by tools/device-check with the GPU machine's
own python3 (pure-Python peers from .device/site on PYTHONPATH).
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
from attnzoo import layouts, ops  # noqa: E402

DEVICE = "cuda"
B, H, D = 1, 16, 64
WINDOW = 256
BIAS_BYTES_LIMIT = 8 << 30  # a materialised (B, H, N, N) bias above this is skipped
COMPOSITE_BYTES_LIMIT = 4 << 30  # the Shaw composite keeps several (B, H, N, N) tensors
DENSE_MASK_LIMIT = 1 << 28  # create_block_mask evaluates the whole (H, N, N) mask; above this the layout is used
BLOCK = 64  # block-sparse sections
LONGFORMER_GLOBALS = 2
SHAW_K = 64
LSH_BUCKET, LSH_HASHES = 64, 4
LINFORMER_K = 256
LINEAR_CHUNK = 64

DENSE_SECTIONS = ["dense", "causal", "t5", "alibi", "window"]
BLOCK_SPARSE_SECTIONS = ["local", "bigbird", "longformer"]
NEW_SECTIONS = BLOCK_SPARSE_SECTIONS + ["shaw", "lsh", "linformer", "linear"]
SECTIONS = DENSE_SECTIONS + NEW_SECTIONS
DENSE_N = [1024, 4096, 8192, 16384, 32768]
NEW_N = [4096, 16384, 32768]


class Contender:
    """fn(q, k, v) -> out (B, H, N, Dv); extra: more leaves that take
    gradients; comparable: computes what attnzoo's contender computes."""

    def __init__(self, fn, extra=(), comparable=True):
        self.fn, self.extra, self.comparable = fn, list(extra), comparable


def failing(error):
    """A contender that could not be set up: it raises when run, so that the
    error is recorded like any other."""
    def run(q, k, v):
        raise error
    return Contender(run, comparable=False)


def flex_contender(flex, make_mask):
    """FlexAttention with the BlockMask make_mask() builds; a BlockMask that
    cannot be built (its dense mask out of memory) makes an error row, not a
    failed section."""
    try:
        mask = make_mask()
    except Exception as e:  # noqa: BLE001
        return failing(e)
    return Contender(lambda q, k, v: flex(q, k, v, block_mask=mask))


def block_layout(section, N):
    nb = layouts.num_blocks(N, BLOCK)
    if section == "local":
        return layouts.local(nb, nb, 1)
    return layouts.bigbird(nb, nb, 1, 1, 2, num_heads=H, seed=0)


def layout_block_mask(layout, N, block, device):
    """FlexAttention's BlockMask for a block layout (Hl, nb, nb): BLOCK_SIZE =
    the layout's block, a mask_mod that looks the layout up at block
    granularity, hence every listed block full (no mask evaluated in the
    kernel). Made by create_block_mask where the dense (Hl, N, N) mask is
    small enough to evaluate; above that, the same BlockMask from the layout
    itself (BlockMask.from_kv_blocks)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    lay = layout.to(device)
    per_head = lay.shape[0] > 1

    def mod(b, h, q_idx, kv_idx):
        return lay[h if per_head else 0, q_idx // block, kv_idx // block]

    if lay.shape[0] * N * N <= DENSE_MASK_LIMIT:
        return create_block_mask(mod, None, lay.shape[0] if per_head else None, N, N, device=device,
                                 BLOCK_SIZE=block)
    full = lay.unsqueeze(0)
    num = full.sum(-1, dtype=torch.int32)
    idx = torch.argsort(full.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=block, mask_mod=mod,
                                    seq_lengths=(N, N))


def longformer_mod(N):
    def mod(b, h, i, j):
        return ((i - j).abs() <= WINDOW) | (j < LONGFORMER_GLOBALS) | (i < LONGFORMER_GLOBALS)
    return mod


def shaw_buckets(N, device):
    i = torch.arange(N, device=device)
    return (i[None, :] - i[:, None]).clamp(-SHAW_K, SHAW_K) + SHAW_K  # (N, N) int64


def shaw_composite(q, k, v, rel_k, rel_v, r):
    """Shaw attention from PyTorch ops (materialises several (B, H, N, N))."""
    Bq, Hq, N, Dq = q.shape
    idx = r.expand(Bq, Hq, N, N)
    s = (q @ k.transpose(-1, -2) + torch.gather(q @ rel_k.t(), -1, idx)) * Dq ** -0.5
    p = torch.softmax(s, -1)
    binned = torch.zeros(Bq, Hq, N, rel_v.shape[0], dtype=p.dtype, device=p.device).scatter_add(-1, idx, p)
    return p @ v + binned @ rel_v


def chunked_causal_linear(q, k, v, chunk=LINEAR_CHUNK, eps=1e-6):
    """Causal linear attention with phi = elu + 1 from PyTorch ops: an explicit
    masked product within each chunk, exclusive prefix sums of the chunks'
    D x Dv states (float32) across them. N must be a multiple of chunk."""
    Bq, Hq, N, Dq = q.shape
    Dv, n = v.shape[-1], N // chunk
    fq = (F.elu(q) + 1).view(Bq, Hq, n, chunk, Dq)
    fk = (F.elu(k) + 1).view(Bq, Hq, n, chunk, Dq)
    vv = v.view(Bq, Hq, n, chunk, Dv)
    states = (fk.transpose(-1, -2) @ vv).float()
    before = (states.cumsum(2) - states).to(q.dtype)
    ksum = fk.float().sum(3)
    zbefore = (ksum.cumsum(2) - ksum).to(q.dtype)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    a = (fq @ fk.transpose(-1, -2)).masked_fill(~tri, 0)
    num = a @ vv + fq @ before
    den = a.sum(-1) + (fq * zbefore.unsqueeze(3)).sum(-1)
    return (num / (den.unsqueeze(-1) + eps)).view(Bq, Hq, N, Dv)


def contenders(section, N, dtype, device=None, compile=True):
    """name -> Contender. ``device``/``compile`` let the wiring be checked on
    a CPU (FlexAttention uncompiled there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    dev = device or DEVICE
    causal = section in ("causal", "alibi", "window")

    def sdpa(backend, **kw):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, **kw)
        return run

    def efficient():
        return sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if dev == "cuda" else contextlib.nullcontext()

    out = {}
    if section in ("dense", "causal"):
        out["attnzoo"] = Contender(lambda q, k, v: ops.attention(q, k, v, causal=causal))
        out["sdpa-flash"] = Contender(sdpa(SDPBackend.FLASH_ATTENTION, is_causal=causal))
        out["sdpa-efficient"] = Contender(sdpa(SDPBackend.EFFICIENT_ATTENTION, is_causal=causal))
        mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, N, N, device=dev) if causal else None
        out["flex"] = Contender(lambda q, k, v: flex(q, k, v, block_mask=mask))
    elif section == "t5":
        table = torch.randn(32, H, device=dev, dtype=torch.float32, requires_grad=True)
        buckets = ops.t5_relative_bucket(torch.arange(1 - N, N)).to(dev)
        out["attnzoo"] = Contender(lambda q, k, v: ops.attention(q, k, v, t5_table=table, scale=1.0), [table])

        def t5_mod(score, b, h, i, j):
            return score + table[buckets[j - i + N - 1], h].to(score.dtype)
        out["flex"] = Contender(lambda q, k, v: flex(q, k, v, score_mod=t5_mod, scale=1.0), [table])
        if B * H * N * N * 2 <= BIAS_BYTES_LIMIT:
            def sdpa_bias(q, k, v):
                idx = buckets[(torch.arange(N, device=dev)[None, :] - torch.arange(N, device=dev)[:, None]) + N - 1]
                bias = table[idx].permute(2, 0, 1).unsqueeze(0).to(q.dtype)
                with efficient():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            out["sdpa-bias"] = Contender(sdpa_bias, [table])
    elif section == "alibi":
        slopes = ops.alibi_slopes(H).to(dev)
        out["attnzoo"] = Contender(lambda q, k, v: ops.attention(q, k, v, alibi_slopes=slopes, causal=True))

        def alibi_mod(score, b, h, i, j):
            return score - (slopes[h] * (i - j).abs()).to(score.dtype)
        mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, N, N, device=dev)
        out["flex"] = Contender(lambda q, k, v: flex(q, k, v, score_mod=alibi_mod, block_mask=mask))
        if B * H * N * N * 2 <= BIAS_BYTES_LIMIT:
            def sdpa_alibi(q, k, v):
                i = torch.arange(N, device=dev)
                dist = (i[:, None] - i[None, :]).abs()
                bias = (-slopes.view(H, 1, 1) * dist).masked_fill(i[None, :] > i[:, None], float("-inf"))
                with efficient():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
            out["sdpa-bias"] = Contender(sdpa_alibi)
    elif section == "window":
        out["attnzoo"] = Contender(lambda q, k, v: ops.attention(q, k, v, causal=True, window=(WINDOW, 0)))
        mask = create_block_mask(lambda b, h, i, j: (j <= i) & (i - j <= WINDOW), None, None, N, N, device=dev)
        out["flex"] = Contender(lambda q, k, v: flex(q, k, v, block_mask=mask))
        if N * N <= BIAS_BYTES_LIMIT:
            i = torch.arange(N, device=dev)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] <= WINDOW)
            out["sdpa-mask"] = Contender(sdpa(SDPBackend.EFFICIENT_ATTENTION, attn_mask=band))
    elif section in ("local", "bigbird"):
        layout = block_layout(section, N)
        dev_layout = layout.to(dev)
        out["attnzoo"] = Contender(lambda q, k, v: ops.block_sparse_attention(q, k, v, dev_layout, BLOCK))
        out["flex"] = flex_contender(flex, lambda: layout_block_mask(layout, N, BLOCK, dev))
    elif section == "longformer":
        global_tokens = list(range(LONGFORMER_GLOBALS))
        out["attnzoo"] = Contender(lambda q, k, v: ops.longformer_attention(q, k, v, WINDOW, global_tokens))
        out["flex"] = flex_contender(flex, lambda: create_block_mask(longformer_mod(N), None, None, N, N,
                                                                     device=dev))
    elif section == "shaw":
        g = torch.Generator(device=dev).manual_seed(N + 1)
        rel_k, rel_v = (torch.randn(2 * SHAW_K + 1, D, device=dev, dtype=dtype, generator=g).requires_grad_()
                        for _ in range(2))
        out["attnzoo"] = Contender(lambda q, k, v: ops.shaw_attention(q, k, v, rel_k, rel_v, SHAW_K),
                                   [rel_k, rel_v])
        out["attnzoo-dense"] = Contender(lambda q, k, v: ops.attention(q, k, v), comparable=False)
        if B * H * N * N * 2 <= BIAS_BYTES_LIMIT:
            r = shaw_buckets(N, dev)

            def sdpa_rel_k(q, k, v):
                bias = torch.gather(q @ (rel_k.t() * D ** -0.5), -1, r.expand(B, H, N, N))
                with efficient():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out["sdpa-bias-rel_k"] = Contender(sdpa_rel_k, [rel_k], comparable=False)
            if B * H * N * N * 2 <= COMPOSITE_BYTES_LIMIT:
                out["torch-composite"] = Contender(lambda q, k, v: shaw_composite(q, k, v, rel_k, rel_v, r),
                                                   [rel_k, rel_v])
    elif section == "lsh":
        g = torch.Generator(device=dev).manual_seed(N + 2)
        n_buckets = N // LSH_BUCKET
        rotations = torch.randn(D, LSH_HASHES, n_buckets // 2, device=dev, generator=g)
        out["attnzoo"] = Contender(lambda q, k, v: ops.lsh_attention(q, v, rotations, LSH_BUCKET))
        try:
            from reformer_pytorch import LSHAttention
            reformer = LSHAttention(bucket_size=LSH_BUCKET, n_hashes=LSH_HASHES, causal=False).eval()

            def reformer_lsh(q, k, v):  # its own rotations: the same work, other buckets
                return reformer(q.reshape(B * H, N, D), v.reshape(B * H, N, -1))[0].view(B, H, N, -1)
            out["reformer-pytorch"] = Contender(reformer_lsh, comparable=False)
        except Exception as e:  # noqa: BLE001  recorded as the peer's error row
            out["reformer-pytorch"] = failing(e)
    elif section == "linformer":
        g = torch.Generator(device=dev).manual_seed(N + 3)
        E = (torch.randn(LINFORMER_K, N, device=dev, generator=g) / math.sqrt(N)).to(dtype)
        out["attnzoo"] = Contender(lambda q, k, v: ops.linformer_attention(q, k, v, E))
        out["sdpa-projected"] = Contender(lambda q, k, v: F.scaled_dot_product_attention(q, E @ k, E @ v))
        try:
            from linformer import LinformerSelfAttention
            out["linformer"] = Contender(linformer_peer(LinformerSelfAttention, E, dev, dtype))
        except Exception as e:  # noqa: BLE001
            out["linformer"] = failing(e)
    elif section == "linear":
        out["attnzoo"] = Contender(lambda q, k, v: ops.linear_attention(q, k, v, causal=True))
        out["torch-chunked"] = Contender(chunked_causal_linear)
        try:
            from linear_attention_transformer.linear_attention_transformer import causal_linear_attn
            out["linear-attention-transformer"] = Contender(
                lambda q, k, v: causal_linear_attn(q, k, v, bucket_size=LINEAR_CHUNK), comparable=False)
        except Exception as e:  # noqa: BLE001
            out["linear-attention-transformer"] = failing(e)
    else:
        raise ValueError(f"tools/bench cuda: unknown section {section!r}; the sections: {' '.join(SECTIONS)}")
    return out


def linformer_peer(cls, E, device, dtype):
    """lucidrains' LinformerSelfAttention with its q / k / out projections
    made identities and v given, so that its forward is the attention alone:
    keys and values projected along the sequence by E, then softmax
    attention over the projected ones."""
    from torch import nn

    class Given(nn.Module):
        value = None

        def forward(self, x):
            return self.value

    N = E.shape[1]
    m = cls(H * D, N, k=LINFORMER_K, heads=H, dim_head=D, share_kv=False)
    m.to_q, m.to_k, m.to_out = nn.Identity(), nn.Identity(), nn.Identity()
    given = m.to_v = Given()
    m = m.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        m.proj_k.copy_(E.t())
        m.proj_v.copy_(E.t())
    m.requires_grad_(False)

    def flat(t):  # (B, H, N, D) -> its (B, N, H * D)
        return t.transpose(1, 2).reshape(B, N, -1)

    def run(q, k, v):
        given.value = flat(v)
        return m(flat(q), context=flat(k)).view(B, N, H, -1).transpose(1, 2)
    return run


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
            torch.autograd.grad(out, leaves, grad, allow_unused=True)  # lsh: k is not used
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(step, warmup=10, rep=60, return_mode="median")
    return ms, torch.cuda.max_memory_allocated() - base


def rel_diff(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def forward_flops(section, N):
    """An estimate of the forward's useful multiply-adds x 2."""
    if section in ("dense", "causal", "alibi", "t5", "shaw"):
        # Shaw is counted as dense attention: its relative terms are gathers of per-row products.
        return 4 * B * H * N * N * D / (2 if section in ("causal", "alibi") else 1)
    if section == "window":
        return 4 * B * H * N * (WINDOW + 1) * D
    if section in ("local", "bigbird"):
        layout = block_layout(section, N)
        blocks = layout.sum().item() * (H // layout.shape[0])
        return 4 * B * D * BLOCK * BLOCK * blocks
    if section == "longformer":
        i = torch.arange(N)
        band = (torch.clamp(i + WINDOW, max=N - 1) - torch.clamp(i - WINDOW, min=0) + 1)
        g = LONGFORMER_GLOBALS
        extra_globals = sum(((i - j).abs() > WINDOW).long() for j in range(g))  # global keys outside the band
        pairs = torch.where(i < g, torch.full_like(i, N), band + extra_globals).sum().item()
        return 4 * B * H * D * pairs
    if section == "lsh":
        return 4 * B * H * LSH_HASHES * N * (2 * LSH_BUCKET) * D
    if section == "linformer":
        return 8 * B * H * N * LINFORMER_K * D
    if section == "linear":
        return B * H * (2 * N * LINEAR_CHUNK * 2 * D + 4 * N * D * D)
    return math.nan


def flops(section, N, backward):
    return forward_flops(section, N) * (3.5 if backward else 1.0)


def parse_sections(items, n, long):
    """['lsh@16384', 'dense'] -> [('lsh', [16384]), ('dense', n or its default)]."""
    plan = []
    for item in items:
        name, _, sizes = item.partition("@")
        if name not in SECTIONS:
            raise SystemExit(f"tools/bench cuda: unknown section {name!r}; the sections: {' '.join(SECTIONS)}")
        if sizes:
            plan.append((name, [int(s) for s in sizes.split(",")]))
        elif n:
            plan.append((name, list(n)))
        else:
            plan.append((name, DENSE_N if name in DENSE_SECTIONS else NEW_N + ([65536] if long else [])))
    return plan


def growth_per_doubling(rows):
    """For the block-sparse sections: time(N2)/time(N1) per doubling between
    consecutive measured sizes, attnzoo and flex."""
    out = []
    for section in BLOCK_SPARSE_SECTIONS:
        for name in ("attnzoo", "flex"):
            for backward in (False, True):
                pts = sorted((r["N"], r["ms"]) for r in rows if r["section"] == section and r["contender"] == name
                             and r["backward"] == backward and "ms" in r)
                for (n1, t1), (n2, t2) in zip(pts, pts[1:]):
                    out.append(dict(section=section, contender=name, backward=backward, N1=n1, N2=n2,
                                    growth=(t2 / t1) ** (1 / math.log2(n2 / n1))))
    return out


def targets(rows):
    """The issue's targets, where their rows were measured."""
    out = []
    ms = {(r["section"], r["N"], r["backward"], r["contender"]): r for r in rows if "ms" in r}
    for (section, N, backward, name), r in sorted(ms.items()):
        if section == "shaw" and name == "attnzoo" and (section, N, backward, "attnzoo-dense") in ms:
            ratio = r["ms"] / ms[(section, N, backward, "attnzoo-dense")]["ms"]
            out.append(dict(target="shaw time / dense time <= 1.3", N=N, backward=backward, value=ratio,
                            met=ratio <= 1.3))
        if section == "lsh" and name == "attnzoo" and (section, N, backward, "reformer-pytorch") in ms:
            peer = ms[(section, N, backward, "reformer-pytorch")]
            speed, mem = peer["ms"] / r["ms"], r["peak_bytes"] / max(peer["peak_bytes"], 1)
            out.append(dict(target="lsh speed vs reformer-pytorch >= 20x", N=N, backward=backward, value=speed,
                            met=speed >= 20))
            out.append(dict(target="lsh peak memory / reformer-pytorch's <= 0.1", N=N, backward=backward,
                            value=mem, met=mem <= 0.1))
    return out


def main(argv):
    ap = argparse.ArgumentParser(prog="tools/bench cuda")
    ap.add_argument("--n", type=int, nargs="+", default=None,
                    help="sizes for the sections without @N (default: 1024 ... 32768 for the dense family, "
                         "4096 16384 32768 for the others)")
    ap.add_argument("--sections", nargs="+", default=SECTIONS,
                    help="sections, each optionally with its own sizes: lsh@16384 local@4096,16384")
    ap.add_argument("--long", action="store_true", help="add N=65536 to the newer sections' default sizes")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--name", default="bench_cuda", help="file names: NAME.json and NAME.png")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no new (section, N) after this many seconds (the rest recorded as not run)")
    args = ap.parse_args(argv)
    plan = parse_sections(args.sections, args.n, args.long)
    if not torch.cuda.is_available():
        sys.exit("tools/bench cuda: no CUDA device")
    # Each (section, N) compiles FlexAttention afresh; past dynamo's default
    # of 8 recompilations it would fall back to the eager (N x N) path.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    dtype = torch.bfloat16
    rows = []
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype="bfloat16", B=B, H=H, D=D,
                sections={name: sizes for name, sizes in plan}, block=BLOCK, window=WINDOW,
                longformer_globals=LONGFORMER_GLOBALS, shaw_k=SHAW_K, lsh_bucket=LSH_BUCKET,
                lsh_hashes=LSH_HASHES, linformer_k=LINFORMER_K)

    def save(**more):  # after every case, so that a run cut short keeps what it measured
        with open(os.path.join(args.out, args.name + ".json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows, **more), f, indent=1)

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bfloat16, B={B} H={H} D={D}")
    print(f"{'section':10} {'N':>6} {'pass':8} {'contender':28} {'ms':>9} {'TFLOP/s':>8} {'peak MiB':>9} "
          f"{'attnzoo speed':>13} {'rel diff':>9}")
    for section, sizes in plan:
        for N in sizes:
            if args.time_limit is not None and time.time() - started > args.time_limit:
                rows.append(dict(section=section, N=N, backward=False, contender="attnzoo",
                                 error=f"not run: --time-limit {args.time_limit:g} s reached"))
                print(f"{section:10} {N:6} not run: --time-limit reached", flush=True)
                continue
            g = torch.Generator(device=DEVICE).manual_seed(N)
            q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
                       for _ in range(3))
            try:
                cands = contenders(section, N, dtype)
            except Exception as e:  # noqa: BLE001  a section that cannot be set up at this N
                rows.append(dict(section=section, N=N, backward=False, contender="attnzoo",
                                 error=f"set-up: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                print(f"{section:10} {N:6} set-up failed: {rows[-1]['error'][:100]}", flush=True)
                continue
            diffs = {}
            with torch.no_grad():
                try:
                    ref = cands["attnzoo"].fn(q, k, v)
                except Exception:  # noqa: BLE001  measured (and recorded) below
                    ref = None
                for name, c in cands.items():
                    if ref is None or not c.comparable:
                        diffs[name] = math.nan
                        continue
                    try:
                        diffs[name] = rel_diff(c.fn(q, k, v), ref)
                    except Exception:  # noqa: BLE001
                        diffs[name] = math.nan
                del ref
            for backward in (False, True):
                times = {}
                for name, c in cands.items():
                    t0 = time.time()
                    try:
                        ms, mem = measure(c.fn, c.extra, q, k, v, backward)
                    except Exception as e:  # a peer that cannot run this case: recorded, not fatal
                        rows.append(dict(section=section, N=N, backward=backward, contender=name,
                                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                        print(f"{section:10} {N:6} {'fwd+bwd' if backward else 'fwd':8} {name:28} failed: "
                              f"{rows[-1]['error'][:80]}", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    times[name] = ms
                    tflops = flops(section, N, backward) / (ms * 1e-3) / 1e12
                    rows.append(dict(section=section, N=N, backward=backward, contender=name, ms=ms,
                                     tflops=tflops, peak_bytes=mem, wall_s=time.time() - t0,
                                     rel_diff=diffs.get(name, math.nan)))
                for r in rows:
                    if r["section"] == section and r["N"] == N and r["backward"] == backward and "ms" in r:
                        r["attnzoo_speed"] = r["ms"] / times["attnzoo"] if "attnzoo" in times else math.nan
                        print(f"{section:10} {N:6} {'fwd+bwd' if backward else 'fwd':8} {r['contender']:28} "
                              f"{r['ms']:9.3f} {r['tflops']:8.1f} {r['peak_bytes'] / 2**20:9.0f} "
                              f"{r['attnzoo_speed']:12.2f}x {r['rel_diff']:9.2g}", flush=True)
                save()
            del q, k, v, cands
            torch.cuda.empty_cache()
    growth, goals = growth_per_doubling(rows), targets(rows)
    if growth:
        print("\n# block-sparse sections: growth per doubling of N (time(2N) / time(N); 2.0 = linear)")
        for r in growth:
            print(f"{r['section']:10} {r['contender']:8} {'fwd+bwd' if r['backward'] else 'fwd':8} "
                  f"{r['N1']:6} -> {r['N2']:6}: {r['growth']:.2f}")
    if goals:
        print("\n# targets")
        for r in goals:
            print(f"{r['target']:45} N={r['N']:6} {'fwd+bwd' if r['backward'] else 'fwd':8} {r['value']:8.3f} "
                  f"{'met' if r['met'] else 'NOT met'}")
    save(growth=growth, targets=goals)
    plot(rows, os.path.join(args.out, args.name + ".png"), meta)


def plot(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = sorted({r["section"] for r in rows}, key=[r["section"] for r in rows].index)
    if not sections:
        return
    cols = min(len(sections), 6)
    bands = -(-len(sections) // cols)
    fig, axes = plt.subplots(2 * bands, cols, figsize=(4 * cols, 7 * bands), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for index, section in enumerate(sections):
        band, col = divmod(index, cols)
        for row, backward in enumerate((False, True)):
            ax = axes[2 * band + row][col]
            ax.set_visible(True)
            pts = [r for r in rows if r["section"] == section and r["backward"] == backward and "ms" in r]
            for name in sorted({r["contender"] for r in pts}):
                mine = sorted((r["N"], r["tflops"]) for r in pts if r["contender"] == name)
                ax.plot([n for n, _ in mine], [t for _, t in mine], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{section}, {'fwd+bwd' if backward else 'fwd'}")
            ax.set_xlabel("N")
            ax.set_ylabel("TFLOP/s (estimated work)")
            ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']}, torch {meta['torch']}, bfloat16, B={meta['B']} H={meta['H']} D={meta['D']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1:])
