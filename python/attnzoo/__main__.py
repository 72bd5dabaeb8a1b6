"""python -m attnzoo pretrain | evaluate | compare | export | plot-attention | report (see attnzoo.train,
.evaluate, .compare, .plot, .report)."""
import argparse
import dataclasses
import json
import os
import sys
import warnings

from .train import TrainOptions, recommended_options


def _parse_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _overrides(parser, items):
    overrides = {}
    for item in items:
        if "=" not in item:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = _parse_value(value)
    return overrides


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m attnzoo",
                                 description="attnzoo: pretrain and evaluate the zoo's models")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a model on the embedded data (resumes an interrupted run)")
    p.add_argument("model", help="a config.json, or a directory holding one (e.g. models/gpt-kjv)")
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--attention", help="attention kind for every layer (dense, rotary, lsh, ...)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model config overrides, e.g. --set hidden_size=128 dropout=0.0")
    p.add_argument("--overwrite", action="store_true",
                   help="start over when --out holds a run of another config or other options (default: refuse; "
                        "the same command resumes an interrupted run)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard "
                        "per block and on the model) instead of replicating them with DDP; same results")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="activation checkpointing per transformer block: less memory for long sequences, about "
                        "one more forward pass per step; same results")
    p.add_argument("--device", default="cpu",
                   help="where to train: cpu (default) or cuda[:N]; under torchrun, cuda is each process's "
                        "LOCAL_RANK GPU and DDP uses NCCL")
    defaults = TrainOptions()
    for field in dataclasses.fields(TrainOptions):
        p.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)), default=None,
                       help=f"(default: the model directory's train.json, else {getattr(defaults, field.name)})")

    e = sub.add_parser("evaluate", help="held-out metrics of a run or checkpoint")
    e.add_argument("path", help="a run directory (its best checkpoint) or a checkpoint directory")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--out", help="where to write the JSON (default: eval-<split>.json in a run directory; "
                                 "for a checkpoint directory only with --out)")
    e.add_argument("--max-batches", type=int, default=0, help="limit the evaluation (0 = the whole split)")
    e.add_argument("--sample-tokens", type=int, default=200,
                   help="GPT: length of the generated sample; speech: 0 skips the transcripts")
    e.add_argument("--context-use", action="store_true",
                   help="GPT: the loss on each window's last targets with the whole window and with only the "
                        "previous --context-short characters, context-use.png (loss by position), and a copy probe (a "
                        "run of shuffled words repeated seq_len - short characters later)")
    e.add_argument("--context-short", type=int, default=None, help="(default: min(256, seq_len / 4))")
    e.add_argument("--context-windows", type=int, default=32, help="windows measured (default: 32)")
    e.add_argument("--beam-size", type=int, default=4,
                   help="speech_seq2seq: beams of the beam-search figures beside the greedy ones (1: greedy only)")
    e.add_argument("--ctc-weight", type=float, default=0.3,
                   help="speech_seq2seq: the CTC prefix scores' weight in the joint beam search (default: 0.3)")
    e.add_argument("--cli", metavar="ATTNZOO_CLI",
                   help="speech_seq2seq: also transcribe the split with this attnzoo-cli (greedy and beam) and count "
                        "the transcripts identical to Python's")

    c = sub.add_parser("compare", help="pretrain one model with several attention kinds at equal steps")
    c.add_argument("model")
    c.add_argument("--out", required=True)
    c.add_argument("--kinds", nargs="+", default=None, help="default: dense t5 alibi rotary local block_sparse "
                   "linformer lsh")
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=None)
    c.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="model config overrides")

    x = sub.add_parser("export", help="copy a run's best checkpoint, optionally in a smaller dtype")
    x.add_argument("path", help="a run directory or a checkpoint directory")
    x.add_argument("destination")
    x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    pa = sub.add_parser("plot-attention", help="attention heat maps (PNG) of a checkpoint on one input")
    pa.add_argument("path", help="a run directory or a checkpoint directory")
    pa.add_argument("--text", help="GPT / BERT: the input text")
    pa.add_argument("--index", type=int, help="ViT / speech: which example of --split (default: 0)")
    pa.add_argument("--split", default="test", choices=["train", "val", "test"])
    pa.add_argument("--layers", type=int, nargs="+", help="layers to draw (default: all)")
    pa.add_argument("--out", default="attention.png")

    r = sub.add_parser("report", help="the zoo on one static HTML page (results, curves, maps, benchmarks)")
    r.add_argument("--out", required=True, help="the page's directory (index.html and assets/)")
    r.add_argument("--models", default="models", help="the model directories (config.json, results.json)")
    r.add_argument("--runs", default="runs", help="run folders whose PNGs to show (loss, attention maps, ...)")
    r.add_argument("--docs", default="docs", help="where the benchmark plots are")

    args = ap.parse_args(argv)
    with warnings.catch_warnings():  # warnings as one plain line each, like the errors
        warnings.showwarning = lambda message, *_: print(f"attnzoo {args.command}: warning: {message}",
                                                         file=sys.stderr)
        return _run(ap, args)


def _run(ap, args) -> int:
    try:
        if args.command == "pretrain":
            from .train import pretrain
            overrides = _overrides(ap, args.set)
            given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)
                     if getattr(args, f.name) is not None}
            options = dataclasses.replace(recommended_options(args.model), **given)
            pretrain(args.model, args.out, options, attention=args.attention, model_overrides=overrides,
                     quiet=args.quiet, overwrite=args.overwrite, fsdp=args.fsdp,
                     checkpoint_activations=args.checkpoint_activations, device=args.device)
            if not args.quiet and os.environ.get("RANK", "0") == "0":
                print(f"done: {args.out} (evaluate with: python -m attnzoo evaluate {args.out})")
        elif args.command == "compare":
            from .compare import compare
            options = recommended_options(args.model)
            given = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
            compare(args.model, args.out, args.kinds, dataclasses.replace(options, **given), _overrides(ap, args.set))
        elif args.command == "export":
            from .evaluate import export
            print(f"wrote {export(args.path, args.destination, args.dtype)}")
        elif args.command == "report":
            from .report import write_report
            print(f"wrote {write_report(args.out, args.models, args.runs, args.docs)}")
        elif args.command == "plot-attention":
            from .plot import plot_attention
            print(f"wrote {plot_attention(args.path, args.out, args.text, args.index, args.split, args.layers)}")
        else:
            from .evaluate import evaluate
            evaluate(args.path, args.split, args.out, args.max_batches, args.sample_tokens,
                     context_use=args.context_use, context_short=args.context_short,
                     context_windows=args.context_windows, beam_size=args.beam_size, ctc_weight=args.ctc_weight,
                     cli=args.cli)
    except (ValueError, OSError, RuntimeError) as error:
        message = str(error)
        # Library messages often start with the function's name; the command is named once.
        message = message[len(args.command) + 2:] if message.startswith(f"{args.command}: ") else message
        print(f"attnzoo {args.command}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
