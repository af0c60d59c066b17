"""``peftkit bench --suite survey``: the comparison of Lialin et al.'s survey (sections 11-12) as a protocol.

Rows: the survey's 15 (full tuning, Houlsby, Pfeiffer, parallel adapter, (IA)3, prefix tuning, prompt tuning, LN
tuning, LoRA on q and v, LoRA on all linear layers, KronA, MAM, Compacter, Compacter++, UniPELT), each with its
method's own default configuration, then every other registered method as an extra row, then two reference rows
(a constant predictor and a frozen-model linear probe). A row whose method is not registered in this peftkit is
listed as ``missing`` (never dropped); methods are looked up by registry name at run time.

Protocol (section 11.1): per row, a learning-rate sweep (default {1e-3, 1e-4, 1e-5}) scored on a validation split
carved from the training rows (never the test rows); then further seeds at the best rate; the test score is reported
as mean +- standard deviation over the seeds at that rate. Every run trains for ``epochs`` passes over the training
rows or at least ``min_steps`` optimiser steps, with one batch size, microbatch and gradient accumulation for all.

Each (row, lr, seed) run is one JSON file under ``<out>/runs/``: an interrupted suite continues from the runs it
finished (same setup), and prints runs done / left with an ETA. Outputs: the terminal table, ``results.json``
(schema ``peftkit-bench-survey/1``, documented in BENCHMARKS.md), three PNG charts and ``report.html`` (one
self-contained file with the charts embedded).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from peftkit.cli.data import Batches, TextDataset, load_text_dataset, split_dataset
from peftkit.cli.measure import MemoryMeter
from peftkit.cli.method_defaults import (FULL, HEAD, NEEDS_INPUT, UsageError, available_methods, method_spec,
                                         validate_method_options)
from peftkit.cli.train import (TrainStats, count_parameters, head_inputs, head_module, linear_probe, load_classifier,
                               make_optimizer, predict, resolve_device, save_trained, train_steps)
from peftkit.engine.io import atomic_write_text

SCHEMA = "peftkit-bench-survey/1"
CONSTANT, PROBE = "constant", "linear_probe"


@dataclass(frozen=True)
class Row:
    name: str  # row id in results.json and for -o ROW:key=value
    title: str  # as the survey names it
    candidates: tuple[str, ...]  # registry names that implement it (first registered wins); () for full tuning
    options: tuple[str, ...] = ()  # key=value on top of the method's defaults; "target_modules=@qv": q and v
    note: str = ""


SURVEY_ROWS: tuple[Row, ...] = (
    Row("full", "Full tuning", (), note="every parameter trains"),
    Row("houlsby", "Houlsby", ("double_seq_bn", "houlsby"), note="bottleneck adapters after attention and FFN"),
    Row("pfeiffer", "Pfeiffer", ("seq_bn", "pfeiffer"), note="bottleneck adapter after the FFN only"),
    Row("parallel", "Parallel adapter", ("par_bn", "parallel", "parallel_adapter"), note="scaled parallel adapter"),
    Row("ia3", "(IA)3", ("ia3",), note="rescaling vectors for keys, values and FFN activations"),
    Row("prefix_tuning", "Prefix tuning", ("prefix_tuning",), note="prefix on keys and values, FCN reparametrised"),
    Row("prompt_tuning", "Prompt tuning", ("prompt_tuning",), note="soft prompt prepended to the input"),
    Row("ln_tuning", "LN tuning", ("ln_tuning",), note="only the layer norms train"),
    Row("lora_qv", "LoRA (q, v)", ("lora",), ("target_modules=@qv",), note="LoRA on the query and value projections"),
    Row("lora_all", "LoRA (all linear)", ("lora",), ("target_modules=all-linear",), note="LoRA on every linear layer"),
    Row("krona", "KronA", ("krona",), note="Kronecker product of two full factors (LoKr recipe)"),
    Row("mam", "MAM", ("mam",), note="prefix tuning + parallel adapter"),
    Row("compacter", "Compacter", ("compacter",), note="Kronecker-factorised adapters after attention and FFN"),
    Row("compacter++", "Compacter++", ("compacter++", "compacterpp", "compacter_plus_plus"),
        note="Compacter after the FFN only"),
    Row("unipelt", "UniPELT", ("unipelt",), note="gated LoRA + prefix tuning + adapters"),
)

QV_NAMES = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin", "q", "v")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("++", "pp").replace("plusplus", "pp").replace("plus_plus", "pp"))


def registered(candidates: tuple[str, ...]) -> Optional[str]:
    """The canonical method name (``LORA``, ``KRONA``, ...) of the first registered candidate, else None."""
    by_norm = {_norm(m): m.upper() for m in available_methods() if m not in (FULL, HEAD)}
    for c in candidates:
        if _norm(c) in by_norm:
            return by_norm[_norm(c)]
    return None


def qv_targets(model: nn.Module) -> list[str]:
    from peftkit.cli.method_defaults import attention_targets

    found = [n for n in attention_targets(model) if n in QV_NAMES]
    if not found:
        raise UsageError(f"{type(model).__name__}: no query/value projections found for the LoRA (q, v) row; pass "
                         "-o lora_qv:target_modules=NAME1,NAME2.")
    return found


def plan_rows() -> list[dict[str, Any]]:
    """Every row of the suite: the survey's 15 (available or missing), then extra rows for the other methods."""
    rows, used = [], set()
    for r in SURVEY_ROWS:
        method = FULL if r.name == "full" else registered(r.candidates)
        if method and method != FULL:
            used.add(method)
        rows.append({"name": r.name, "title": r.title, "survey": True, "method": method, "options": list(r.options),
                     "note": r.note, "status": "planned" if method else "missing",
                     "reason": None if method else f"no registered method named {' / '.join(r.candidates)} in this "
                     "peftkit (the row is kept so that the gap shows)"})
    for m in [x.upper() for x in available_methods() if x not in (FULL, HEAD)]:
        if m in used:
            continue
        row = {"name": m.lower(), "title": m.lower(), "survey": False, "method": m, "options": [],
               "note": "registered in peftkit, not in the survey", "status": "planned", "reason": None}
        if m in NEEDS_INPUT:
            row.update(status="skipped", reason=NEEDS_INPUT[m])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class SurveyArgs:
    model: Optional[str] = None
    data: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    methods: Optional[list[str]] = None  # restrict to these rows (row names or method names)
    method_options: list[str] = field(default_factory=list)  # "ROW_OR_METHOD:key=value"
    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-4, 1e-5])
    seeds: int = 3
    epochs: float = 3.0
    min_steps: int = 100
    batch_size: int = 16
    microbatch: Optional[int] = None
    train_size: int = 2000
    val_size: float = 0.2
    test_size: int = 500
    infer_batches: int = 4
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    in_process: bool = False
    out: str = "bench_results"
    progress: bool = True
    threads: Optional[int] = None
    fresh: bool = False


def accumulation(args: SurveyArgs) -> tuple[int, int]:
    """(microbatch, accumulation steps): the same for every method."""
    micro = args.microbatch or args.batch_size
    if micro <= 0 or args.batch_size % micro:
        raise UsageError(f"--microbatch {micro} must divide --batch-size {args.batch_size}.")
    return micro, args.batch_size // micro


def split_three(data: TextDataset, args: SurveyArgs) -> tuple[TextDataset, TextDataset, TextDataset]:
    """(fit, validation, test): the test rows as ``peftkit train`` splits them; validation carved from the training
    rows (a fraction when < 1, else a row count)."""
    train, test = split_dataset(data, args.train_size, args.test_size, args.seed)
    n_val = int(round(args.val_size * len(train))) if args.val_size < 1 else int(args.val_size)
    if not 1 <= n_val < len(train):
        raise UsageError(f"--val-size {args.val_size:g} leaves no validation or no training rows out of {len(train)}.")
    order = list(range(len(train)))
    return train.subset(order[n_val:]), train.subset(order[:n_val]), test


def budget_steps(n_fit: int, args: SurveyArgs) -> int:
    """Optimiser steps of every run: ``epochs`` passes over the fit rows, at least ``min_steps``."""
    return max(args.min_steps, math.ceil(args.epochs * n_fit / args.batch_size))


def _options_for(row: dict[str, Any], options: list[str]) -> list[str]:
    out = list(row["options"])
    for opt in options:
        if ":" not in opt.split("=", 1)[0]:
            raise UsageError(f"bench --method-option {opt!r}: name the row or method, e.g. lora_qv:r=16 or lora:r=16.")
        name, rest = opt.split(":", 1)
        if _norm(name) in (_norm(row["name"]), _norm(row["method"] or "")):
            out.append(rest)
    return out


def _setup_key(args: SurveyArgs, row: dict[str, Any], options: list[str]) -> str:
    """What a finished run must share with this suite to be reused."""
    keep = {k: v for k, v in asdict(args).items() if k in (
        "model", "data", "text_column", "label_column", "epochs", "min_steps", "batch_size", "microbatch",
        "train_size", "val_size", "test_size", "max_length", "seed", "dtype", "infer_batches")}
    keep.update(row=row["name"], method=row["method"], options=options)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- one run
def _phases(config: Any, steps: int) -> list[tuple[str, int, int]]:
    """Training phases of multi-phase methods (AdaLoRA: warm-up, budgeting, final fine-tuning)."""
    if config is None or not all(hasattr(config, k) for k in ("tinit", "tfinal", "total_step")):
        return [("train", 0, steps)]
    a = min(steps, int(config.tinit))
    b = max(a, min(steps, int(config.total_step) - int(config.tfinal)))
    return [(n, s, e) for n, s, e in (("warmup", 0, a), ("budgeting", a, b), ("final", b, steps)) if e > s]


def run_one(args: SurveyArgs, row: dict[str, Any], options: list[str], lr: float, seed: int) -> dict[str, Any]:
    """Train one row at one learning rate and seed; every number of the survey's metrics for it."""
    from peftkit.cli.bench import infer_throughput, update_stats
    from peftkit.cli.train import prepare_model

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device = resolve_device(args.device)
    data = load_text_dataset(args.data, args.text_column, args.label_column)
    fit, val, test = split_three(data, args)
    model, tokenizer, info = load_classifier(args.model, len(data.label_names), seed, args.dtype, args.device)
    micro, accum = accumulation(args)
    steps = budget_steps(len(fit), args)
    method = row["method"]
    options = [("target_modules=" + ",".join(qv_targets(model))) if o == "target_modules=@qv" else o for o in options]
    head_name = head_module(model)[0]
    original = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    if method in (FULL, HEAD):
        model, config = prepare_model(method, model, options, steps)
    else:
        from peftkit.cli.method_defaults import build_method_config
        from peftkit.engine.mapping import get_peft_model

        config = build_method_config(method, model, options, steps, library_targets=True)
        try:
            model = get_peft_model(model, config)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise UsageError(f"{type(model).__name__} cannot take {row['name']}: {exc}") from None
        config = model.peft_config["default"]
    trainable, total = count_parameters(model)
    fit_b = Batches(fit, tokenizer, micro, args.max_length, shuffle=True, seed=seed)
    val_b = Batches(val, tokenizer, 64, args.max_length, shuffle=False)
    test_b = Batches(test, tokenizer, 64, args.max_length, shuffle=False)
    optimizer = make_optimizer(model, lr)
    torch.manual_seed(seed)
    batches, stats, phases = fit_b.cycle(), TrainStats(), []
    for name, s, e in _phases(config, steps):
        meter = MemoryMeter(device)
        meter.start()
        before = (stats.seconds, stats.tokens)
        train_steps(model, batches, e - s, optimizer, device, args.progress, f"{row['name']} lr {lr:g} seed {seed}",
                    stats=stats, accumulation=accum)
        mem = meter.stop()
        secs, toks = stats.seconds - before[0], stats.tokens - before[1]
        phases.append({"phase": name, "steps": e - s, "train_tokens_per_s": toks / secs if secs else 0.0,
                       "peak_memory_mib": mem["peak_memory_mib"], "memory_kind": mem["memory_kind"]})
    del optimizer

    def score(b: Batches) -> float:
        pred, gold, _, _ = predict(model, b, device)
        return float((pred == gold).float().mean())

    infer = list(test_b)[: max(1, args.infer_batches)]
    result: dict[str, Any] = {
        "row": row["name"], "method": method.lower(), "lr": lr, "seed": seed, "options": options,
        "config": config.to_dict() if config is not None else None,
        "trainable_params": trainable, "all_params": total, "train_steps": stats.steps, "microbatch": micro,
        "accumulation": accum, "train_tokens_per_s": stats.steady_tokens_per_s(),
        "peak_memory_mib": max(p["peak_memory_mib"] for p in phases), "memory_kind": phases[0]["memory_kind"],
        "memory_isolated": not args.in_process or device.type == "cuda",
        "phases": phases if len(phases) > 1 else None, "final_loss": stats.ema,
        "val_score": score(val_b), "test_score": score(test_b), "score_name": "accuracy",
        "infer_tokens_per_s_unmerged": infer_throughput(model, infer, device),
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_trained(model, method, tmp, tokenizer)
        result["checkpoint_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs)
    if method in (FULL, HEAD):
        result.update(update_stats(original, model, head_name), infer_tokens_per_s_merged=None)
    elif method_spec(method).supports_merge:
        try:
            merged = model.merge_and_unload()
            result.update(update_stats(original, merged, head_name))
            result["infer_tokens_per_s_merged"] = infer_throughput(merged, infer, device)
        except (ValueError, NotImplementedError, AttributeError, RuntimeError) as exc:
            result.update(changed_params=None, update_rank=None, infer_tokens_per_s_merged=None, merge_error=str(exc))
    else:
        result.update(changed_params=None, update_rank=None, infer_tokens_per_s_merged=None)
    result.update(model=info, fit_rows=len(fit), val_rows=len(val), test_rows=len(test),
                  wall_seconds=time.perf_counter() - start)
    return result


def _run_isolated(args: SurveyArgs, row: dict[str, Any], options: list[str], lr: float, seed: int) -> dict[str, Any]:
    errors = (UsageError, ValueError, RuntimeError, TypeError, NotImplementedError, KeyError)
    if args.in_process:
        try:
            return run_one(args, row, options, lr, seed)
        except errors as exc:
            return {"row": row["name"], "lr": lr, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
    with tempfile.TemporaryDirectory() as tmp:
        spec, res = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(spec, "w", encoding="utf-8") as fh:
            json.dump({"args": asdict(args), "row": row, "options": options, "lr": lr, "seed": seed}, fh)
        proc = subprocess.run([sys.executable, "-m", "peftkit.cli.survey", "--worker", spec, res],
                              stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.returncode != 0 or not os.path.isfile(res):
            tail = (proc.stdout or "").strip().splitlines()[-3:]
            return {"row": row["name"], "lr": lr, "seed": seed,
                    "error": f"worker exited with {proc.returncode}: {' | '.join(tail)}"}
        with open(res, encoding="utf-8") as fh:
            return json.load(fh)


# -------------------------------------------------------------------------------------------- references
def references(args: SurveyArgs) -> list[dict[str, Any]]:
    """The constant predictor (the fit rows' majority label) and the linear probe on frozen features (one frozen
    pass; the probe's rate is chosen on the validation rows like every row's, then mean +- std over the seeds)."""
    device = resolve_device(args.device)
    data = load_text_dataset(args.data, args.text_column, args.label_column)
    fit, val, test = split_three(data, args)
    counts = [fit.labels.count(k) for k in range(len(data.label_names))]
    majority = max(range(len(counts)), key=counts.__getitem__)
    const = {"name": CONSTANT, "title": "Constant predictor", "survey": False, "reference": True, "status": "ok",
             "method": None, "note": f"always predicts the fit rows' majority label {data.label_names[majority]!r}",
             "score_mean": sum(1 for y in test.labels if y == majority) / len(test), "score_std": 0.0, "n_seeds": 1,
             "trainable_params": 0, "val_score": sum(1 for y in val.labels if y == majority) / len(val)}
    model, tokenizer, _ = load_classifier(args.model, len(data.label_names), args.seed, args.dtype, args.device)
    feats = {}
    for name, ds in (("fit", fit), ("val", val), ("test", test)):
        x, _, y = head_inputs(model, Batches(ds, tokenizer, 64, args.max_length, shuffle=False), device)
        feats[name] = (x, y)
    head = head_module(model)[1]
    probe: dict[str, Any] = {"name": PROBE, "title": "Linear probe", "survey": False, "reference": True,
                             "method": HEAD, "note": "head trained on the frozen model's features (full batch)",
                             "trainable_params": sum(p.numel() for p in head.parameters())}
    if feats["fit"][0] is None:
        probe.update(status="skipped", reason="the head pools inside (no per-example feature)")
        return [const, probe]
    sweep = []
    for lr in sorted(set(args.lrs) | {1e-2}):  # full-batch: 100 steps, so the probe also gets a larger rate
        v = linear_probe(head, *feats["fit"], *feats["val"], lr=lr, seed=args.seed)
        sweep.append({"lr": lr, "val_score": v})
    best = max(sweep, key=lambda s: s["val_score"])["lr"]
    scores = [linear_probe(head, *feats["fit"], *feats["test"], lr=best, seed=args.seed + i) for i in range(args.seeds)]
    probe.update(status="ok", sweep=sweep, best_lr=best, test_scores=scores, n_seeds=len(scores),
                 score_mean=sum(scores) / len(scores), score_std=_std(scores))
    return [const, probe]


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _mean(xs: list[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------------------ the suite
def _run_path(out: str, row: str, lr: float, seed: int) -> str:
    return os.path.join(out, "runs", f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', row)}__lr{lr:g}__seed{seed}.json")


def _load_done(path: str, key: str) -> Optional[dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            done = json.load(fh)
    except (OSError, ValueError):
        return None
    return done if done.get("setup_key") == key and "error" not in done else None


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_survey(args: SurveyArgs, log: Any = print) -> dict[str, Any]:
    """Run (or continue) the suite in ``args.out``; print the table; write results.json, the charts and the
    report. Returns the report."""
    t0 = time.perf_counter()
    if not args.lrs or any(lr <= 0 for lr in args.lrs):
        raise UsageError("--lrs needs at least one positive learning rate.")
    if args.seeds < 1 or args.min_steps < 0 or args.epochs <= 0:
        raise UsageError("--seeds must be at least 1, --epochs positive and --min-steps not negative.")
    accumulation(args)
    rows = plan_rows()
    if args.methods:
        wanted = {_norm(m) for m in args.methods}
        known = {_norm(r["name"]) for r in rows} | {_norm(r["method"] or "") for r in rows}
        unknown = [m for m in args.methods if _norm(m) not in known]
        if unknown:
            raise UsageError(f"--methods {', '.join(unknown)}: not a row of the survey suite; rows: "
                             f"{', '.join(r['name'] for r in rows)}.")
        rows = [r for r in rows if _norm(r["name"]) in wanted or _norm(r["method"] or "") in wanted]
    planned = [r for r in rows if r["status"] == "planned"]
    for r in planned:  # every option checked before any training
        opts = [o for o in _options_for(r, args.method_options) if o != "target_modules=@qv"]
        validate_method_options(r["method"], opts)
    data = load_text_dataset(args.data, args.text_column, args.label_column)
    fit, val, test = split_three(data, args)
    steps = budget_steps(len(fit), args)
    micro, accum = accumulation(args)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    log(f"[survey] {len(rows)} rows ({len(planned)} to run, {sum(r['status'] == 'missing' for r in rows)} missing, "
        f"{sum(r['status'] == 'skipped' for r in rows)} skipped); data {len(fit)} fit / {len(val)} validation / "
        f"{len(test)} test rows; {steps} steps of batch {args.batch_size} (microbatch {micro} x {accum}); "
        f"lrs {', '.join(f'{x:g}' for x in args.lrs)}; {args.seeds} seed(s) at the best rate")
    for r in rows:
        if r["status"] != "planned":
            log(f"[survey] {r['name']}: {r['status']}: {r['reason']}")

    per_row = len(args.lrs) + args.seeds - 1
    total_runs = per_row * len(planned)
    done_runs, durations = 0, []

    def progress(row_i: int, r: dict[str, Any], what: str) -> None:
        left = total_runs - done_runs
        eta = f", ETA {_fmt_eta(left * sum(durations) / len(durations))}" if durations and left else ""
        log(f"[survey] row {row_i + 1}/{len(planned)} {r['name']} {what}: runs {done_runs} done / {left} left{eta}")

    def run(row_i: int, r: dict[str, Any], opts: list[str], lr: float, seed: int) -> dict[str, Any]:
        nonlocal done_runs
        key = _setup_key(args, r, opts)
        path = _run_path(args.out, r["name"], lr, seed)
        done = None if args.fresh else _load_done(path, key)
        if done is not None:
            done_runs += 1
            durations.append(done.get("wall_seconds", 0.0))
            return done
        progress(row_i, r, f"lr {lr:g} seed {seed}")
        result = _run_isolated(args, r, opts, lr, seed)
        result["setup_key"] = key
        durations.append(result.get("wall_seconds", 0.0) or 0.0)
        done_runs += 1
        atomic_write_text(path, json.dumps(result, indent=1, default=str) + "\n")
        return result

    model_info = None
    for i, r in enumerate(planned):
        opts = _options_for(r, args.method_options)
        sweep = [run(i, r, opts, lr, args.seed) for lr in args.lrs]
        failed = [s for s in sweep if "error" in s]
        if failed:
            r.update(status="failed", reason=failed[0]["error"], sweep=[_brief(s) for s in sweep])
            done_runs += args.seeds - 1
            log(f"[survey] {r['name']}: failed: {failed[0]['error'][:200]}")
            continue
        best = max(sweep, key=lambda s: (s["val_score"], -args.lrs.index(s["lr"])))
        seeds = [best] + [run(i, r, opts, best["lr"], args.seed + k) for k in range(1, args.seeds)]
        bad = [s for s in seeds if "error" in s]
        if bad:
            r.update(status="failed", reason=bad[0]["error"], sweep=[_brief(s) for s in sweep])
            continue
        model_info = model_info or best.get("model")
        scores = [s["test_score"] for s in seeds]
        tps = [s["train_tokens_per_s"] for s in seeds]
        r.update(
            status="ok", sweep=[_brief(s) for s in sweep], best_lr=best["lr"], test_scores=scores,
            n_seeds=len(scores), score_mean=sum(scores) / len(scores), score_std=_std(scores),
            val_score=best["val_score"], trainable_params=best["trainable_params"], all_params=best["all_params"],
            changed_params=best.get("changed_params"), update_rank=best.get("update_rank"),
            peak_memory_mib=_mean([s["peak_memory_mib"] for s in seeds]),
            peak_memory_std=_std([s["peak_memory_mib"] for s in seeds]), memory_kind=best["memory_kind"],
            memory_isolated=best["memory_isolated"], train_tokens_per_s=_mean(tps), train_tokens_per_s_std=_std(tps),
            infer_tokens_per_s_unmerged=_mean([s["infer_tokens_per_s_unmerged"] for s in seeds]),
            infer_tokens_per_s_merged=_mean([s.get("infer_tokens_per_s_merged") for s in seeds]),
            checkpoint_bytes=best["checkpoint_bytes"], train_steps=best["train_steps"], phases=best.get("phases"),
            options=best["options"], config=best["config"],
        )
        log(f"[survey] {r['name']}: best lr {best['lr']:g} (validation {best['val_score']:.4f}); test "
            f"{r['score_mean']:.4f} +- {r['score_std']:.4f} over {len(scores)} seed(s)")

    log("[survey] reference rows: constant predictor, linear probe ...")
    refs = references(args)
    warnings = noise_warnings(rows, refs, len(test))
    report = {
        "schema": SCHEMA, "command": " ".join(["peftkit"] + sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None,
        "created_unix": time.time(), "environment": _environment(args),
        "setup": {**{k: v for k, v in asdict(args).items() if k not in ("progress", "fresh")},
                  "fit_rows": len(fit), "val_rows": len(val), "test_rows": len(test), "train_steps": steps,
                  "microbatch": micro, "accumulation": accum, "labels": data.label_names},
        "model": model_info, "rows": rows, "references": refs, "warnings": warnings,
        "runs_dir": os.path.join(args.out, "runs"), "wall_seconds": time.perf_counter() - t0,
        "runs_total": total_runs,
    }
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(report, indent=2, default=str) + "\n")
    log(format_survey_table(report))
    for w in warnings:
        log(w)
    try:
        charts = write_survey_charts(report, args.out)
        page = write_report_html(report, charts, os.path.join(args.out, "report.html"))
        log(f"wrote {os.path.join(args.out, 'results.json')}, {', '.join(charts.values())} and {page}")
    except ImportError:
        log(f"wrote {os.path.join(args.out, 'results.json')} (no charts or report: pip install matplotlib)")
    return report


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("lr", "seed", "val_score", "test_score", "final_loss", "train_steps", "error")
    return {k: run[k] for k in keys if k in run}


def noise_warnings(rows: list[dict[str, Any]], refs: list[dict[str, Any]], n_test: int) -> list[str]:
    """Flag rows whose score is within noise of the constant predictor: the margin is at most twice the combined
    standard error (the binomial error of an accuracy on ``n_test`` rows and the seeds' spread)."""
    const = next(r for r in refs if r["name"] == CONSTANT)["score_mean"]
    ok = [r for r in rows if r["status"] == "ok"]
    near = []
    for r in ok:
        se = math.sqrt(max(r["score_mean"] * (1 - r["score_mean"]), 1e-12) / n_test + r["score_std"] ** 2)
        r["within_noise_of_constant"] = r["score_mean"] - const <= 2 * se
        if r["within_noise_of_constant"]:
            near.append(r["name"])
    out = []
    if near:
        out.append(f"warning: {len(near)} of {len(ok)} rows score within noise of the constant predictor "
                   f"({const:.4f}): {', '.join(near)}. "
                   + ("This run is too short (or its data too small) to rank methods: raise --epochs / --min-steps "
                      "or --train-size / --test-size." if len(near) * 2 >= len(ok) else
                      "Those rows did not learn the task at any swept rate within the budget."))
    return out


def _environment(args: SurveyArgs) -> dict[str, Any]:
    from peftkit.cli.bench import environment

    return environment(resolve_device(args.device), None)


# ------------------------------------------------------------------------------------------------ reporting
def _f(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def format_survey_table(report: dict[str, Any]) -> str:
    from peftkit.cli.bench import _columns

    head = ["row", "method", "best lr", "score (mean +- std)", "trainable", "changed", "rank", "peak MiB",
            "train tok/s", "infer tok/s", "merged tok/s", "ckpt KiB"]
    lines = []
    for r in report["rows"] + report["references"]:
        name = r["name"] + ("" if r.get("survey") or r.get("reference") else " (extra)")
        if r["status"] != "ok":
            short = {"missing": "not registered here"}.get(r["status"], str(r.get("reason"))[:48])
            lines.append([name, (r.get("method") or "-").lower(), "", f"{r['status']} ({short})"] + [""] * (len(head) - 4))
            continue
        rank = r.get("update_rank")
        noise = " ~const" if r.get("within_noise_of_constant") else ""
        lines.append([name, (r.get("method") or "-").lower(), _f(r.get("best_lr"), "g"),
                      f"{r['score_mean']:.4f} +- {r['score_std']:.4f}{noise}", _f(r.get("trainable_params")),
                      _f(r.get("changed_params")),
                      "-" if not rank else (str(rank["max"]) if rank["min"] == rank["max"] else f"{rank['min']}-{rank['max']}"),
                      _f(r.get("peak_memory_mib")), _f(r.get("train_tokens_per_s")),
                      _f(r.get("infer_tokens_per_s_unmerged")), _f(r.get("infer_tokens_per_s_merged")),
                      _f(r["checkpoint_bytes"] / 1024, ",.1f") if r.get("checkpoint_bytes") else "-"])
    out = _columns(head, lines)
    missing = [r["name"] for r in report["rows"] if r["status"] == "missing"]
    if missing:
        out.append(f"missing ({len(missing)} of the survey's rows, no such method registered yet): {', '.join(missing)}")
    phased = [r for r in report["rows"] if r.get("phases")]
    for r in phased:
        out.append(f"{r['name']} phases: " + "; ".join(
            f"{p['phase']} {p['steps']} steps, {p['train_tokens_per_s']:,.0f} tok/s, peak {p['peak_memory_mib']:,.0f} MiB"
            for p in r["phases"]))
    s = report["setup"]
    out.append(f"score: test accuracy at the best validation lr, mean +- std over "
               f"the seeds; {s['train_steps']} steps of batch {s['batch_size']}; ~const: within noise of the "
               "constant predictor")
    return "\n".join(out)


def write_survey_charts(report: dict[str, Any], out: str) -> dict[str, str]:
    """score_vs_params.png, score_vs_memory.png, throughput_vs_memory.png (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["status"] == "ok"]
    refs = {r["name"]: r for r in report["references"] if r["status"] == "ok"}
    setup = report["setup"]
    subtitle = (f"{(report.get('model') or {}).get('name', '')}, {setup['fit_rows']} fit rows, {setup['train_steps']} "
                f"steps of batch {setup['batch_size']}, {setup['seeds']} seed(s); o: survey row, ^: extra row")
    paths = {}

    def frame(name: str, title: str) -> tuple[Any, Any]:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        ax.set_title(f"{title}\n{subtitle}", fontsize=10)
        ax.grid(alpha=0.3)
        return fig, ax

    def marker(r: dict[str, Any]) -> str:
        return "o" if r.get("survey") else "^"

    def ref_lines(ax: Any) -> None:
        for name, style in ((CONSTANT, ":"), (PROBE, "--")):
            if name in refs:
                ax.axhline(refs[name]["score_mean"], ls=style, color="grey", lw=1)
                ax.annotate(refs[name]["title"], (0.01, refs[name]["score_mean"]), xycoords=("axes fraction", "data"),
                            fontsize=8, color="grey", va="bottom")

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[name.split(".")[0]] = path

    fig, ax = frame("params", "Test accuracy vs trainable parameters")
    for r in rows:
        x = max(r["trainable_params"], 1)
        ax.errorbar(x, r["score_mean"], yerr=r["score_std"], fmt=marker(r), capsize=3)
        ax.annotate(r["name"], (x, r["score_mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ref_lines(ax)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy (mean +- std over seeds)")
    save(fig, "score_vs_params.png")

    kind = rows[0]["memory_kind"] if rows else ""
    fig, ax = frame("memory", "Test accuracy vs peak training memory")
    for r in rows:
        ax.errorbar(r["peak_memory_mib"], r["score_mean"], xerr=r.get("peak_memory_std") or 0, yerr=r["score_std"],
                    fmt=marker(r), capsize=3)
        ax.annotate(r["name"], (r["peak_memory_mib"], r["score_mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ref_lines(ax)
    ax.set_xlabel(f"peak memory during training (MiB, {kind})")
    ax.set_ylabel("test accuracy (mean +- std over seeds)")
    save(fig, "score_vs_memory.png")

    fig, ax = frame("throughput", "Training throughput vs peak training memory")
    for r in rows:
        ax.errorbar(r["peak_memory_mib"], r["train_tokens_per_s"], xerr=r.get("peak_memory_std") or 0,
                    yerr=r.get("train_tokens_per_s_std") or 0, fmt=marker(r), capsize=3)
        ax.annotate(r["name"], (r["peak_memory_mib"], r["train_tokens_per_s"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel(f"peak memory during training (MiB, {kind})")
    ax.set_ylabel("training throughput (tokens/s, mean +- std over seeds)")
    save(fig, "throughput_vs_memory.png")
    return paths


def write_report_html(report: dict[str, Any], charts: dict[str, str], path: str) -> str:
    """One HTML file with the table, the warnings, the missing rows and the charts embedded (base64 PNG)."""
    e = html.escape
    s = report["setup"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>peftkit bench --suite survey</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
             ".warn{color:#a40}</style></head><body>",
             "<h1>peftkit bench --suite survey</h1>",
             f"<p>Model {e(str((report.get('model') or {}).get('name', '-')))}; {s['fit_rows']} fit / {s['val_rows']} "
             f"validation / {s['test_rows']} test rows; {s['train_steps']} optimiser steps of batch {s['batch_size']} "
             f"(microbatch {s['microbatch']} x {s['accumulation']}); learning rates "
             f"{', '.join(f'{x:g}' for x in s['lrs'])} chosen on the validation rows; {s['seeds']} seed(s) at the "
             f"best rate. Device {e(str(report['environment'].get('device')))}, "
             f"{e(str(report['environment'].get('cpu')))}. Wall time {report['wall_seconds'] / 60:.1f} min.</p>"]
    for w in report["warnings"]:
        parts.append(f"<p class='warn'>{e(w)}</p>")
    parts.append("<pre>" + e(format_survey_table(report)) + "</pre>")
    for name, p in charts.items():
        with open(p, "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        parts.append(f"<h2>{e(name.replace('_', ' '))}</h2><img alt='{e(name)}' src='data:image/png;base64,{data}'>")
    parts.append("<p>Fields and units: BENCHMARKS.md (schema " + e(report["schema"]) + ").</p></body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def _worker(spec_path: str, result_path: str) -> int:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    args = SurveyArgs(**spec["args"])
    try:
        result = run_one(args, spec["row"], spec["options"], spec["lr"], spec["seed"])
    except (UsageError, ValueError, RuntimeError, TypeError, NotImplementedError, KeyError) as exc:
        result = {"row": spec["row"]["name"], "lr": spec["lr"], "seed": spec["seed"],
                  "error": f"{type(exc).__name__}: {exc}"}
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, default=str)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m peftkit.cli.survey --worker JOB.json RESULT.json (use `peftkit bench --suite survey`)")
