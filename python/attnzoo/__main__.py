"""python -m attnzoo pretrain | evaluate | export (see attnzoo.train and attnzoo.evaluate)."""
import argparse
import dataclasses
import json
import os
import sys

from .train import TrainOptions, recommended_options


def _parse_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m attnzoo", description="attnzoo: pretrain and evaluate the zoo's models")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a model on the embedded data (resumes an interrupted run)")
    p.add_argument("model", help="a config.json, or a directory holding one (e.g. models/gpt-kjv)")
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--attention", help="attention kind for every layer (dense, rotary, lsh, ...)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="model config overrides, e.g. --set hidden_size=128 dropout=0.0")
    p.add_argument("--quiet", action="store_true")
    defaults = TrainOptions()
    for field in dataclasses.fields(TrainOptions):
        p.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)), default=None,
                       help=f"(default: the model directory's train.json, else {getattr(defaults, field.name)})")

    e = sub.add_parser("evaluate", help="held-out metrics of a run or checkpoint")
    e.add_argument("path", help="a run directory (its best checkpoint) or a checkpoint directory")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--out", help="where to write the JSON (default: eval-<split>.json in the run)")
    e.add_argument("--max-batches", type=int, default=0, help="limit the evaluation (0 = the whole split)")
    e.add_argument("--sample-tokens", type=int, default=200, help="GPT: length of the generated sample")

    x = sub.add_parser("export", help="copy a run's best checkpoint, optionally in a smaller dtype")
    x.add_argument("path", help="a run directory or a checkpoint directory")
    x.add_argument("destination")
    x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    args = ap.parse_args(argv)
    try:
        if args.command == "pretrain":
            from .train import pretrain
            overrides = {}
            for item in args.set:
                if "=" not in item:
                    ap.error(f"--set takes KEY=VALUE, got {item!r}")
                key, value = item.split("=", 1)
                overrides[key] = _parse_value(value)
            given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)
                     if getattr(args, f.name) is not None}
            options = dataclasses.replace(recommended_options(args.model), **given)
            pretrain(args.model, args.out, options, attention=args.attention, model_overrides=overrides,
                     quiet=args.quiet)
            if not args.quiet and os.environ.get("RANK", "0") == "0":
                print(f"done: {args.out} (evaluate with: python -m attnzoo evaluate {args.out})")
        elif args.command == "export":
            from .evaluate import export
            print(f"wrote {export(args.path, args.destination, args.dtype)}")
        else:
            from .evaluate import evaluate
            evaluate(args.path, args.split, args.out, args.max_batches, args.sample_tokens)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"attnzoo {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
