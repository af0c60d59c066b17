"""``peftkit bench``: the survey's comparison (Lialin et al., sections 11-12) as a tool.

Every method gets the same model, data, batch and number of optimiser steps. Per method it reports the three
parameter counts of guideline 1 (trainable, changed, rank of the update), peak memory during training, training
and inference throughput (inference merged and unmerged where the method merges), checkpoint size, and the
task score after the fixed budget (guidelines 2 and 3). Field names and units: BENCHMARKS.md.

Isolation: by default each method runs in a fresh subprocess (``python -m peftkit.cli.bench --worker``), so that on
CPU the peak resident set size (``ru_maxrss``) of one method cannot include another's allocations. ``--in-process``
runs everything here (faster; CPU memory numbers are then marked as not isolated).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from peftkit.cli.data import Batches, load_text_dataset, split_dataset
from peftkit.cli.measure import MemoryMeter, _max_rss_mib, _rss_mib  # noqa: F401  (re-exported)
from peftkit.cli.method_defaults import FULL, HEAD, NEEDS_INPUT, UsageError, default_lr, parse_method_options, resolve_method
from peftkit.engine.registry import get_method, supported_methods
from peftkit.cli.train import (count_parameters, head_module, load_classifier, make_optimizer, predict, prepare_model,
                    resolve_device, save_trained, train_steps)

SCHEMA = "peftkit-bench/1"
OURS, PEFT = "peftkit", "peft"


@dataclass
class BenchArgs:
    model: Optional[str] = None
    data: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    methods: Optional[list[str]] = None
    method_options: list[str] = field(default_factory=list)  # "method:key=value"
    steps: int = 30
    batch_size: int = 16
    lr: Optional[float] = None
    train_size: int = 2000
    test_size: int = 500
    infer_batches: int = 4
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    against: Optional[str] = None
    in_process: bool = False
    out: str = "bench_results"
    progress: bool = True
    threads: Optional[int] = None


# --------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def infer_throughput(model: nn.Module, batches: list, device: torch.device) -> float:
    """Tokens/s of eval forwards over ``batches`` (after one warm-up forward)."""
    model.eval()
    model(**batches[0].to(device).inputs)
    seconds, tokens = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        start = time.perf_counter()
        model(**batch.inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        tokens += batch.n_tokens
    return tokens / seconds if seconds else 0.0


def update_rank(original: torch.Tensor, diff: torch.Tensor) -> int:
    """Numerical rank of a merged weight's update ``diff``. Merging rounds every element of ``W + delta`` to the
    weight's precision, so singular values below that rounding level (relative to W, not to the update, which can
    be tiny after a few steps) are noise, not rank."""
    eps = torch.finfo(torch.float32).eps
    s = torch.linalg.svdvals(diff)
    tol = max(diff.shape) * eps * max(float(s[0]), float(torch.linalg.matrix_norm(original, ord=2)))
    return int((s > tol).sum())


@torch.no_grad()
def update_stats(original: dict[str, torch.Tensor], model: nn.Module, head_name: str) -> dict[str, Any]:
    """Changed parameters (elements that differ from the original weights) and the rank of each changed weight
    matrix's update, for a model whose adapters are merged into its weights."""
    changed, ranks = 0, []
    for name, p in model.state_dict().items():
        if name not in original or original[name].shape != p.shape:
            continue
        diff = p.detach().float().cpu() - original[name].float()
        n = int((diff != 0).sum())
        changed += n
        # The head trains in full under every method; its rank says nothing about the method.
        if n and diff.dim() == 2 and not name.startswith(head_name + "."):
            ranks.append(update_rank(original[name].float(), diff))
    return {"changed_params": changed,
            "update_rank": ({"min": min(ranks), "max": max(ranks), "mean": sum(ranks) / len(ranks),
                             "matrices": len(ranks)} if ranks else None)}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


# ------------------------------------------------------------------------------------------------- peft side
def _peft() -> Any:
    try:
        import peft  # noqa: PLC0415  (only for --against peft: the reference library, never used otherwise)
    except ImportError:
        raise UsageError("--against peft needs the reference library: pip install peft") from None
    return peft


def peft_has(method: str) -> bool:
    if method in (FULL, HEAD):
        return False
    try:
        peft = _peft()
    except UsageError:
        return False
    return method in {t.value for t in peft.PeftType} and hasattr(peft, get_method(method).config_cls.__name__)


def to_peft_model(model: nn.Module, config: Any) -> nn.Module:
    """The same method with the same config through Hugging Face PEFT."""
    import dataclasses

    peft = _peft()
    cls = getattr(peft, type(config).__name__)
    names = {f.name for f in dataclasses.fields(cls)} - {"peft_type"}
    kwargs = {k: v for k, v in config.to_dict().items() if k in names and v is not None}
    return peft.get_peft_model(model, cls(**kwargs))


# ------------------------------------------------------------------------------------------------- one method
@dataclass
class Job:
    method: str
    library: str
    args: dict[str, Any]
    options: list[str]


def _setup(args: BenchArgs) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    data = load_text_dataset(args.data, args.text_column, args.label_column)
    train_ds, test_ds = split_dataset(data, args.train_size, args.test_size, args.seed)
    model, tokenizer, info = load_classifier(args.model, len(data.label_names), args.seed, args.dtype, args.device)
    train_b = Batches(train_ds, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=args.seed)
    test_b = Batches(test_ds, tokenizer, args.batch_size, args.max_length, shuffle=False)
    info.update(train_rows=len(train_ds), test_rows=len(test_ds), labels=len(data.label_names))
    return model, tokenizer, train_b, test_b, info


def bench_method(job: Job) -> dict[str, Any]:
    """Every number for one method through one library, in this process."""
    args = BenchArgs(**job.args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer, train_b, test_b, info = _setup(args)
    head_name = head_module(model)[0]
    original = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    model, config = prepare_model(job.method, model, job.options, args.steps)
    if job.library == PEFT:
        if config is not None and getattr(config, "target_modules", "") is None:
            # the method chose its own targets ((IA)^3, LN tuning): give PEFT exactly the modules we adapted
            config = copy.deepcopy(model.peft_config["default"])
        model = to_peft_model(model.unload(), config)
    elif config is not None:  # the model's copy: the task wrapper added the classifier to modules_to_save
        config = model.peft_config["default"]
    trainable, total = count_parameters(model)
    lr = args.lr if args.lr is not None else default_lr(job.method)
    optimizer = make_optimizer(model, lr)
    meter = MemoryMeter(device)
    meter.start()
    stats = train_steps(model, train_b.cycle(), args.steps, optimizer, device, args.progress, f"{job.method.lower()} ({job.library})")
    memory = meter.stop()
    del optimizer
    pred, gold, _, _ = predict(model, test_b, device)
    infer_batches = list(test_b)[: max(1, args.infer_batches)]
    result: dict[str, Any] = {
        "method": job.method.lower(), "library": job.library, "options": job.options,
        "config": config.to_dict() if config is not None else None, "lr": lr,
        "trainable_params": trainable, "all_params": total, "trainable_percent": 100 * trainable / total,
        **memory, "memory_isolated": not args.in_process or device.type == "cuda",
        "train_steps": stats.steps, "train_tokens": stats.tokens, "train_seconds": stats.seconds,
        "train_tokens_per_s": stats.steady_tokens_per_s(), "final_loss": sum(stats.losses[-5:]) / len(stats.losses[-5:]),
        "score": float((pred == gold).float().mean()), "score_name": "accuracy",
        "infer_tokens_per_s_unmerged": infer_throughput(model, infer_batches, device),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if job.library == PEFT:
            model.save_pretrained(tmp)
        else:
            save_trained(model, job.method, tmp, tokenizer)
        result["checkpoint_bytes"] = _dir_bytes(tmp)
    mergeable = job.method in (FULL, HEAD) or (job.library == OURS and get_method(job.method).supports_merge) or (
        job.library == PEFT and hasattr(model, "merge_and_unload"))
    if job.method in (FULL, HEAD):
        result.update(update_stats(original, model, head_name), infer_tokens_per_s_merged=None)
    elif mergeable:
        try:
            merged = model.merge_and_unload()
            result.update(update_stats(original, merged, head_name))
            result["infer_tokens_per_s_merged"] = infer_throughput(merged, infer_batches, device)
        except (ValueError, NotImplementedError, AttributeError) as exc:
            result.update(changed_params=None, update_rank=None, infer_tokens_per_s_merged=None,
                          merge_error=str(exc))
    else:
        result.update(changed_params=None, update_rank=None, infer_tokens_per_s_merged=None)
    result["model"] = info
    return result


def interleaved_speed(job: Job, rounds: int) -> dict[str, Any]:
    """Train-step and forward throughput of peftkit and peft on copies of one base model in one process,
    alternating which library goes first each round, so that load from other processes hits both alike."""
    args = BenchArgs(**job.args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    base, _, train_b, test_b, _ = _setup(args)
    ours, config = prepare_model(job.method, copy.deepcopy(base), job.options, args.steps)
    theirs = to_peft_model(copy.deepcopy(base), config)
    del base
    models = {OURS: ours, PEFT: theirs}
    lr = args.lr if args.lr is not None else default_lr(job.method)
    opts = {k: make_optimizer(m, lr) for k, m in models.items()}
    batches = train_b.cycle()
    train = {k: [0.0, 0] for k in models}
    infer = {k: [0.0, 0] for k in models}
    test = list(test_b)[: max(1, args.infer_batches)]
    for r in range(rounds + 1):
        batch = next(batches)
        order = [OURS, PEFT] if r % 2 == 0 else [PEFT, OURS]
        for lib in order:
            st = train_steps(models[lib], iter([batch]), 1, opts[lib], device)
            if r:  # round 0 is warm-up
                train[lib][0] += st.seconds
                train[lib][1] += st.tokens
        for lib in order:
            tb = test[r % len(test)].to(device)
            models[lib].eval()
            with torch.no_grad():
                start = time.perf_counter()
                models[lib](**tb.inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if r:
                    infer[lib][0] += time.perf_counter() - start
                    infer[lib][1] += tb.n_tokens
    out = {"method": job.method.lower(), "rounds": rounds}
    for lib in models:
        out[f"{lib}_train_tokens_per_s"] = train[lib][1] / train[lib][0]
        out[f"{lib}_infer_tokens_per_s_unmerged"] = infer[lib][1] / infer[lib][0]
    out["train_speed_ratio"] = out[f"{OURS}_train_tokens_per_s"] / out[f"{PEFT}_train_tokens_per_s"]
    out["infer_speed_ratio"] = out[f"{OURS}_infer_tokens_per_s_unmerged"] / out[f"{PEFT}_infer_tokens_per_s_unmerged"]
    return out


def _run(kind: str, job: Job, in_process: bool, rounds: int = 0) -> dict[str, Any]:
    """Run one job here or in a fresh subprocess; a failure becomes an ``error`` entry, not a crash."""
    if in_process:
        try:
            return bench_method(job) if kind == "method" else interleaved_speed(job, rounds)
        except (UsageError, ValueError, RuntimeError, TypeError, NotImplementedError) as exc:
            return {"method": job.method.lower(), "library": job.library, "error": f"{type(exc).__name__}: {exc}"}
    with tempfile.TemporaryDirectory() as tmp:
        spec, res = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(spec, "w", encoding="utf-8") as fh:
            json.dump({"kind": kind, "job": asdict(job), "rounds": rounds}, fh)
        proc = subprocess.run([sys.executable, "-m", "peftkit.cli.bench", "--worker", spec, res],
                              stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.returncode != 0 or not os.path.isfile(res):
            tail = (proc.stdout or "").strip().splitlines()[-3:]
            return {"method": job.method.lower(), "library": job.library,
                    "error": f"worker exited with {proc.returncode}: {' | '.join(tail)}"}
        with open(res, encoding="utf-8") as fh:
            return json.load(fh)


# ------------------------------------------------------------------------------------------------ the bench
def default_methods() -> list[str]:
    return [m for m in supported_methods() if m not in NEEDS_INPUT] + [FULL, HEAD]


def environment(device: torch.device, against: Optional[str]) -> dict[str, Any]:
    import transformers

    from peftkit import __version__

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peftkit": __version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), env["cpu"])
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    if against:
        env["peft"] = _peft().__version__
    return env


def _options_for(method: str, options: list[str]) -> list[str]:
    """The ``key=value`` parts of the ``method:key=value`` options that name ``method``."""
    out = []
    for opt in options:
        if ":" not in opt.split("=", 1)[0]:
            raise UsageError(f"bench --method-option {opt!r}: name the method, e.g. lora:r=16.")
        name, rest = opt.split(":", 1)
        if resolve_method(name) == method:
            out.append(rest)
    return out


def run_bench(args: BenchArgs, log: Any = print) -> dict[str, Any]:
    """Run every method, print the table, write ``results.json`` and ``bench.png`` into ``args.out``."""
    device = resolve_device(args.device)
    methods = [resolve_method(m) for m in args.methods] if args.methods else default_methods()
    if args.steps < 1:
        raise UsageError("--steps must be at least 1.")
    for method in methods:  # fail on a typo before any method runs
        opts = _options_for(method, args.method_options)
        if opts and method not in (FULL, HEAD):
            parse_method_options(get_method(method).config_cls, opts)
    load_text_dataset(args.data, args.text_column, args.label_column)  # clear errors before spawning workers
    job_args = asdict(args)
    results, comparisons = [], []
    for method in methods:
        job = Job(method, OURS, job_args, _options_for(method, args.method_options))
        log(f"[bench] {method.lower()} ...")
        results.append(_run("method", job, args.in_process))
        if args.against and peft_has(method):
            results.append(_run("method", Job(method, PEFT, job_args, job.options), args.in_process))
            comparisons.append(_run("interleave", job, args.in_process, rounds=max(2, min(args.steps, 20))))
    ok = [r for r in results if "error" not in r]
    report = {
        "schema": SCHEMA, "command": " ".join(["peftkit", "bench"] + sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "created_unix": time.time(), "environment": environment(device, args.against),
        "setup": {k: v for k, v in asdict(args).items() if k not in ("progress",)},
        "model": ok[0]["model"] if ok else None,
        "results": [{k: v for k, v in r.items() if k != "model"} for r in results], "comparisons": comparisons,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
    log(format_table(report))
    try:
        chart = write_chart(report, os.path.join(args.out, "bench.png"))
        log(f"wrote {os.path.join(args.out, 'results.json')} and {chart}")
    except ImportError:
        log(f"wrote {os.path.join(args.out, 'results.json')} (no chart: pip install matplotlib)")
    return report


# ------------------------------------------------------------------------------------------------ reporting
def _fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(report: dict[str, Any]) -> str:
    head = ["method", "lib", "trainable", "changed", "rank", "peak MiB", "train tok/s", "infer tok/s",
            "merged tok/s", "ckpt KiB", "score"]
    rows = []
    for r in report["results"]:
        if "error" in r:
            rows.append([r["method"], r["library"], "failed: " + r["error"][:80]] + [""] * (len(head) - 3))
            continue
        rank = r.get("update_rank")
        rows.append([r["method"], r["library"], _fmt(r["trainable_params"]), _fmt(r.get("changed_params")),
                     "-" if not rank else (str(rank["max"]) if rank["min"] == rank["max"] else f"{rank['min']}-{rank['max']}"),
                     _fmt(r["peak_memory_mib"]), _fmt(r["train_tokens_per_s"]), _fmt(r["infer_tokens_per_s_unmerged"]),
                     _fmt(r.get("infer_tokens_per_s_merged")), _fmt(r["checkpoint_bytes"] / 1024, ",.1f"),
                     _fmt(r["score"], ".4f")])
    lines = _columns(head, rows)
    if report["comparisons"]:
        head2 = ["method", "train x (ours/peft)", "infer x (ours/peft)", "memory x (ours/peft)", "score ours-peft"]
        by = {(r["method"], r["library"]): r for r in report["results"] if "error" not in r}
        rows2 = []
        for c in report["comparisons"]:
            if "error" in c:
                rows2.append([c["method"], "failed: " + c["error"][:80], "", "", ""])
                continue
            o, p = by.get((c["method"], OURS)), by.get((c["method"], PEFT))
            mem = o["peak_memory_mib"] / p["peak_memory_mib"] if o and p else None
            score = o["score"] - p["score"] if o and p else None
            rows2.append([c["method"], _fmt(c["train_speed_ratio"], ".2f"), _fmt(c["infer_speed_ratio"], ".2f"),
                          _fmt(mem, ".2f"), _fmt(score, "+.4f")])
        lines += [""] + _columns(head2, rows2)
    return "\n".join(lines)


def _columns(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def write_chart(report: dict[str, Any], path: str) -> str:
    """Two panels: score vs trainable parameters (log x), and training throughput vs peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    for r in rows:
        label = r["method"] + (" (peft)" if r["library"] == PEFT else "")
        marker = "s" if r["library"] == PEFT else "o"
        a.scatter(max(r["trainable_params"], 1), r["score"], marker=marker)
        a.annotate(label, (max(r["trainable_params"], 1), r["score"]), fontsize=8)
        b.scatter(r["peak_memory_mib"], r["train_tokens_per_s"], marker=marker)
        b.annotate(label, (r["peak_memory_mib"], r["train_tokens_per_s"]), fontsize=8)
    a.set_xscale("log")
    a.set_xlabel("trainable parameters")
    a.set_ylabel(f"test {rows[0]['score_name'] if rows else 'score'} after {report['setup']['steps']} steps")
    b.set_xlabel("peak memory during training (MiB, " + (rows[0]["memory_kind"] if rows else "") + ")")
    b.set_ylabel("training throughput (tokens/s)")
    model = (report.get("model") or {}).get("name", "")
    fig.suptitle(f"peftkit bench: {model}, batch {report['setup']['batch_size']}, device {report['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _worker(spec_path: str, result_path: str) -> int:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    job = Job(**spec["job"])
    try:
        result = bench_method(job) if spec["kind"] == "method" else interleaved_speed(job, spec["rounds"])
    except (UsageError, ValueError, RuntimeError, TypeError, NotImplementedError) as exc:
        result = {"method": job.method.lower(), "library": job.library, "error": f"{type(exc).__name__}: {exc}"}
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, default=str)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m peftkit.cli.bench --worker JOB.json RESULT.json (use `peftkit bench` instead)")
