"""Training-step and inference speed/memory of every registered peftkit method against Hugging Face PEFT.

Builds a Llama-shaped model with random weights and, for each method, runs peftkit and peft in the same process,
interleaved round by round with the frozen-base limit (forward+backward with every weight frozen and input
gradients enabled), and reports the median step time, tokens/s and peak memory as ratios to that limit and to
the reference. Inference: the base forward vs unmerged LoRA, and batches mixing 8 and 64 LoRA adapters.

    python benchmarks/speed.py                      # CPU: hidden 256, 4 layers, MLP 688, 4 heads, 4 x 128, fp32
    python benchmarks/speed.py --gpu                # GPU: hidden 2048, 16 layers, MLP 5632, 32/8 heads, 8 x 1024, bf16
    python benchmarks/speed.py --methods lora-all,dora-all --steps 5 --json out.json

Time: on GPU the wall time of a step (synchronised); on CPU the process's CPU time with one thread (the
machine's cores are shared, so wall time mostly measures other jobs' load); wall medians are kept in the JSON.
Memory: on GPU the peak allocated bytes of a step (everything resident for that model: weights, optimizer state,
gradients, activations); on CPU, where no allocator statistics exist, the bytes autograd saves for backward
(activations, distinct storages, parameters excluded) plus weights, gradients and optimizer state.
This is a benchmark, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (peft_type, config kwargs shared by both libraries, extra env for peftkit during the run)
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, str]]] = {
    "lora-qv": ("LORA", dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]), {}),
    "lora-all": ("LORA", dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR), {}),
    "lora-all-auto": ("LORA", dict(r=16, lora_alpha=32, target_modules=ALL_LINEAR), {"PEFTKIT_LORA_PATH": "auto"}),
    "dora-all": ("LORA", dict(r=16, lora_alpha=32, use_dora=True, target_modules=ALL_LINEAR), {}),
    "loha-all": ("LOHA", dict(r=16, alpha=32, target_modules=ALL_LINEAR), {}),
    "lokr-all": ("LOKR", dict(r=16, alpha=32, target_modules=ALL_LINEAR), {}),
    "oft-all-b32": ("OFT", dict(r=0, oft_block_size=32, target_modules=ALL_LINEAR), {}),
    "boft-qv-b4": ("BOFT", dict(boft_block_size=4, target_modules=["q_proj", "v_proj"]), {}),
    "hra-all-r8": ("HRA", dict(r=8, target_modules=ALL_LINEAR), {}),
    "adalora-qv": ("ADALORA", dict(init_r=12, target_r=8, total_step=1000, target_modules=["q_proj", "v_proj"]), {}),
    "ia3": ("IA3", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), {}),
    "ln-tuning": ("LN_TUNING", dict(target_modules=["input_layernorm", "post_attention_layernorm", "norm"]), {}),
    "prompt-tuning-20": ("PROMPT_TUNING", dict(num_virtual_tokens=20), {}),
    "prefix-tuning-30": ("PREFIX_TUNING", dict(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=512), {}),
    "p-tuning-20": ("P_TUNING", dict(num_virtual_tokens=20, encoder_hidden_size=256), {}),
    "llama-adapter-10": ("ADAPTION_PROMPT", dict(adapter_len=10, adapter_layers=4), {}),
    "miss-all": ("MISS", dict(target_modules=ALL_LINEAR), {}),
    # sub-layer adapters (AdapterHub's presets; Hugging Face PEFT has none, so only ours vs the limit)
    "seq_bn": ("SEQ_BN", dict(), {}),
    "double_seq_bn": ("DOUBLE_SEQ_BN", dict(), {}),
    "par_bn": ("PAR_BN", dict(), {}),
    "compacter": ("COMPACTER", dict(), {}),
    # hybrids (AdapterHub's MAMConfig() and UniPELTConfig() defaults)
    "mam": ("MAM", dict(), {}),
    "unipelt": ("UNIPELT", dict(), {}),
}
NO_PEFT_REFERENCE = {"SEQ_BN", "DOUBLE_SEQ_BN", "PAR_BN", "COMPACTER", "COMPACTER++", "MAM", "UNIPELT"}


# ------------------------------------------------------------------------------------------------ setup
def shapes(gpu: bool, vocab: Optional[int]) -> dict[str, Any]:
    if gpu:
        return dict(hidden=2048, layers=16, mlp=5632, heads=32, kv=8, vocab=vocab or 32000, batch=8, seq=1024,
                    dtype=torch.bfloat16, device="cuda",
                    # mixed-adapter serving (issue 16): prefill 64 x 256 and decode-shaped calls (one token per row)
                    mixed=[(8, 64, 256), (32, 64, 256), (64, 64, 256), (8, 64, 1), (32, 64, 1), (64, 64, 1)])
    # CPU: a 1024-token vocabulary, so that the LM head (which no method touches) does not dominate the step
    return dict(hidden=256, layers=4, mlp=688, heads=4, kv=4, vocab=vocab or 1024, batch=4, seq=128,
                dtype=torch.float32, device="cpu", mixed=[(8, 8, 64), (64, 64, 16)])


def build_base(s: dict[str, Any]) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=4096, attn_implementation="sdpa")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(s["device"]):
        model = LlamaForCausalLM(cfg)
    return model.to(s["dtype"]).train()


def method_configs(name: str) -> tuple[Callable[[], Any], Callable[[], Any], dict[str, str]]:
    """(peftkit config factory, peft config factory, env) for a benchmark entry."""
    import peft

    import peftkit
    from peftkit.engine.registry import get_method

    peft_type, kwargs, env = METHODS[name]
    ours_cls = get_method(peft_type).config_cls
    kw = dict(kwargs, task_type="CAUSAL_LM")
    if peft_type in NO_PEFT_REFERENCE:
        return (lambda: ours_cls(**copy.deepcopy(kw))), None, env
    ref_cls = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    return (lambda: ours_cls(**copy.deepcopy(kw))), (lambda: ref_cls(**copy.deepcopy(kw))), env


@contextmanager
def env_vars(env: dict[str, str]):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


OPTIMIZER_KW: dict[str, Any] = {}


class Runner:
    """One model under test: a training step (or a forward) plus its memory bookkeeping."""

    def __init__(self, label: str, model: torch.nn.Module, train: bool, env: Optional[dict[str, str]] = None,
                 fwd_kwargs: Optional[dict[str, Any]] = None) -> None:
        self.label, self.model, self.train, self.env = label, model, train, env or {}
        self.fwd_kwargs = fwd_kwargs or {}
        params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        # OPTIMIZER_KW: {} is torch's default AdamW (a Python loop over parameters on CPU, multi-tensor on GPU);
        # --optimizer fused gives every runner the fused kernel instead
        self.opt = torch.optim.AdamW(params, lr=1e-5, **OPTIMIZER_KW) if (train and params) else None
        self.times: list[float] = []
        self.wall: list[float] = []
        self.mem: list[float] = []
        self.saved: list[int] = []

    def static_bytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.model.parameters())
        n += sum(t.numel() * t.element_size() for t in self.model.buffers())
        if self.opt is not None:
            for st in self.opt.state.values():
                n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
        return n

    def step(self, ids: torch.Tensor, cuda: bool) -> None:
        with env_vars(self.env):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0, c0 = time.perf_counter(), time.process_time()
            if self.train:
                saved = _SavedBytes(self.model) if not cuda else None
                with saved if saved is not None else _null():
                    out = self.model(input_ids=ids, labels=ids, **self.fwd_kwargs)
                out.loss.backward()
                if self.opt is not None:
                    self.opt.step()
                    self.opt.zero_grad(set_to_none=True)
                else:
                    self.model.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    self.model(input_ids=ids, **self.fwd_kwargs)
            if cuda:
                torch.cuda.synchronize()
            # GPU: wall time. CPU: this process's CPU time, since the machine's cores are shared with other jobs
            # and wall time mostly measures their load (run with --threads 1 so no thread spins while waiting).
            self.times.append(time.perf_counter() - t0 if cuda else time.process_time() - c0)
            self.wall.append(time.perf_counter() - t0)
            if cuda:
                self.mem.append(torch.cuda.max_memory_allocated() - before + self.static_bytes())
            elif self.train:
                grads = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
                self.saved.append(saved.bytes)
                self.mem.append(saved.bytes + grads + self.static_bytes())

    def median(self, warmup: int) -> float:
        return statistics.median(self.times[warmup:] or self.times)

    def paired_ratio(self, other: "Runner", warmup: int) -> float:
        """Median over rounds of this runner's step time divided by ``other``'s step in the same round. The
        machine's speed drifts by 10-30% over a run (shared cores, frequency); adjacent steps see the same
        drift, so the per-round ratio is far steadier than a ratio of two medians."""
        pairs = list(zip(self.times, other.times))[warmup:] or list(zip(self.times, other.times))
        return statistics.median(a / b for a, b in pairs)

    def peak(self) -> float:
        return max(self.mem) if self.mem else float("nan")


@contextmanager
def _null():
    yield


class _SavedBytes:
    """Counts distinct non-parameter storages autograd saves for backward (CPU memory proxy)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.seen: set[int] = set()
        self.bytes = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.skip and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += st.nbytes()
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def interleave(runners: list[Runner], ids: torch.Tensor, rounds: int, cuda: bool) -> None:
    """One step of each runner per round; the order rotates each round so no runner always goes first."""
    for i in range(rounds):
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            r.step(ids, cuda)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ training
def frozen_limit(base: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(base)
    m.requires_grad_(False)
    m.enable_input_require_grads()  # input gradients flow through every layer, as with an adapter
    return m


def _train_one(base, name, ids, warmup, steps, cuda) -> dict[str, Any]:
    """One method: the frozen-base limit, peftkit and peft, interleaved step by step."""
    import peft

    import peftkit

    tokens = ids.numel()
    limit = Runner("limit", frozen_limit(base), train=True)
    runners = [limit]
    try:
        if name == "full-ft":
            runners.append(Runner("ours", copy.deepcopy(base).requires_grad_(True), train=True))
        else:
            ours_cfg, ref_cfg, env = method_configs(name)
            with env_vars(env):
                runners.append(Runner("ours", peftkit.get_peft_model(copy.deepcopy(base), ours_cfg()), train=True, env=env))
            if ref_cfg is not None:
                runners.append(Runner("peft", peft.get_peft_model(copy.deepcopy(base), ref_cfg()), train=True))
        interleave(runners, ids, warmup + steps, cuda)
    except Exception as e:  # one method failing must not lose the others' numbers
        return {"method": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    lim_t, lim_m = limit.median(warmup), limit.peak()
    row: dict[str, Any] = {"method": name, "limit_s": lim_t, "limit_mem": lim_m}
    if not cuda:
        row["limit_saved_bytes"] = max(limit.saved)
    for r in runners[1:]:
        t, m = r.median(warmup), r.peak()
        row[r.label] = {"step_s": t, "tokens_per_s": tokens / t, "mem_bytes": m, "time_vs_limit": r.paired_ratio(limit, warmup),
                        "mem_vs_limit": m / lim_m, "trainable": r.n_trainable, "times": r.times,
                        "wall_s": statistics.median(r.wall[warmup:] or r.wall)}
        if r.saved:
            row[r.label]["saved_bytes"] = max(r.saved)
        if r.label == "ours" and isinstance(r.model, peftkit.PeftModel):
            paths = {getattr(mod, "fast_path", None) for mod in r.model.modules()} - {None, ""}
            if paths:
                row["ours"]["paths"] = sorted(paths)
    if "peft" in row:
        row["ours"]["time_vs_peft"] = runners[1].paired_ratio(runners[2], warmup)
        row["ours"]["mem_vs_peft"] = row["ours"]["mem_bytes"] / row["peft"]["mem_bytes"]
    return row


def bench_training(base, s, names, warmup, steps, log) -> list[dict[str, Any]]:
    import peftkit

    cuda = s["device"] == "cuda"
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(s["device"])
    registered = set(peftkit.supported_methods())
    rows = []
    for name in ["full-ft"] + names:
        if name != "full-ft" and METHODS[name][0] not in registered:
            log(f"  skip {name}: {METHODS[name][0]} is not registered in peftkit")
            continue
        row = _train_one(base, name, ids, warmup, steps, cuda)
        rows.append(row)
        log(fmt_train_row(row))
        free()
    return rows


def fmt_train_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['method']:<18} error: {row['error']}"
    o, p = row["ours"], row.get("peft")
    s = (f"{row['method']:<18} limit {row['limit_s'] * 1e3:8.1f} ms {row['limit_mem'] / 2**20:9.1f} MiB | "
         f"ours {o['step_s'] * 1e3:8.1f} ms {o['tokens_per_s']:9.0f} tok/s x{o['time_vs_limit']:.2f} time "
         f"x{o['mem_vs_limit']:.2f} mem")
    if p:
        s += (f" | peft {p['step_s'] * 1e3:8.1f} ms x{p['time_vs_limit']:.2f} time x{p['mem_vs_limit']:.2f} mem | "
              f"ours/peft x{o['time_vs_peft']:.2f} time x{o['mem_vs_peft']:.2f} mem")
    return s


# ------------------------------------------------------------------------------------------------ inference
def _lora_cfgs(r: int = 16):
    import peft

    import peftkit

    kw = dict(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR, init_lora_weights=False, task_type="CAUSAL_LM")
    return (lambda: peftkit.LoraConfig(**kw)), (lambda: peft.LoraConfig(**kw))


def _with_adapters(lib, base, cfg, n: int):
    model = lib.get_peft_model(copy.deepcopy(base), cfg())
    names = ["default"]
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg())
        names.append(f"a{i}")
    model.set_adapter("default")
    return model.eval(), names


def _infer_one(base, s, label, n, b, t, warmup, steps, cuda) -> dict[str, Any]:
    import peft

    import peftkit

    ours_cfg, ref_cfg = _lora_cfgs()
    ids = torch.randint(0, s["vocab"], (b, t), generator=torch.Generator().manual_seed(1)).to(s["device"])
    runners = [Runner("base", copy.deepcopy(base).eval(), train=False)]
    try:
        ours, names = _with_adapters(peftkit, base, ours_cfg, n)
        ref, _ = _with_adapters(peft, base, ref_cfg, n)
        kw = {"adapter_names": [names[i % n] for i in range(b)]} if n > 1 else {}
        runners += [Runner("ours", ours, train=False, fwd_kwargs=kw), Runner("peft", ref, train=False, fwd_kwargs=kw)]
        del ours, ref
        interleave(runners, ids, warmup + steps, cuda)
    except Exception as e:
        return {"case": label, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    base_t = runners[0].median(warmup)
    row: dict[str, Any] = {"case": label, "adapters": n, "batch": b, "seq": t, "base_s": base_t}
    for r in runners[1:]:
        row[r.label] = {"s": r.median(warmup), "vs_base": r.paired_ratio(runners[0], warmup)}
    row["ours"]["vs_peft"] = runners[1].paired_ratio(runners[2], warmup)
    return row


def bench_inference(base, s, warmup, steps, log) -> list[dict[str, Any]]:
    cuda = s["device"] == "cuda"
    rows = []
    cases = [("lora-unmerged", 1, s["batch"], s["seq"])] + [
        (f"mixed-{n}" + ("-decode" if t == 1 else ""), n, b, t) for n, b, t in s["mixed"]]
    for label, n, b, t in cases:
        row = _infer_one(base, s, label, n, b, t, warmup, steps, cuda)
        rows.append(row)
        if "error" in row:
            log(f"  {label}: {row['error']}")
        else:
            log(f"{label:<14} {b}x{t}: base {row['base_s'] * 1e3:8.1f} ms | ours x{row['ours']['vs_base']:.2f} | "
                f"peft x{row['peft']['vs_base']:.2f} | ours/peft x{row['ours']['vs_peft']:.2f}")
        free()
    return rows


def bench_sublayer_inference(base, s, names, warmup, steps, log) -> list[dict[str, Any]]:
    """Forward of the base vs the same model with one sub-layer adapter (SeqBn, DoubleSeqBn, ...), interleaved."""
    import peftkit

    cuda = s["device"] == "cuda"
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1)).to(s["device"])
    rows = []
    for name in [n for n in names if METHODS[n][0] in NO_PEFT_REFERENCE]:
        ours_cfg, _, _ = method_configs(name)
        runners = [Runner("base", copy.deepcopy(base).eval(), train=False),
                   Runner("ours", peftkit.get_peft_model(copy.deepcopy(base), ours_cfg()).eval(), train=False)]
        interleave(runners, ids, warmup + steps, cuda)
        row = {"case": f"{name}-forward", "base_s": runners[0].median(warmup),
               "ours": {"s": runners[1].median(warmup), "vs_base": runners[1].paired_ratio(runners[0], warmup)}}
        rows.append(row)
        log(f"{name + '-forward':<22} base {row['base_s'] * 1e3:8.1f} ms | ours x{row['ours']['vs_base']:.3f}")
        free()
    return rows


# Methods whose inference is measured merged and unmerged against the base forward (the survey: (IA)^3 and LN
# tuning cost nothing once merged; unmerged, (IA)^3 adds one elementwise product per adapted layer).
MERGE_INFER_METHODS = ("ia3", "ln-tuning")


def _noised(model: torch.nn.Module, prefix: str) -> torch.nn.Module:
    """Make the adapter non-trivial (values do not change the cost; merged weights then differ from the base)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if prefix in n:
                p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.05)
    return model


def bench_merge_inference(base, s, warmup, steps, log, names=MERGE_INFER_METHODS) -> list[dict[str, Any]]:
    """Base forward vs the method unmerged, merged (``merge_adapter()``: wrappers stay, weights hold the adapter)
    and peft unmerged, interleaved round by round; ratios are medians of per-round ratios to the base."""
    import peft

    import peftkit
    from peftkit.engine.registry import get_method

    cuda = s["device"] == "cuda"
    registered = set(peftkit.supported_methods())
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1)).to(s["device"])
    rows = []
    for name in names:
        peft_type = METHODS[name][0]
        if peft_type not in registered:
            log(f"  skip {name} inference: {peft_type} is not registered in peftkit")
            continue
        try:
            ours_cfg, ref_cfg, env = method_configs(name)
            prefix = get_method(peft_type).prefix
            unmerged = _noised(peftkit.get_peft_model(copy.deepcopy(base), ours_cfg()), prefix).eval()
            merged = copy.deepcopy(unmerged)
            merged.merge_adapter()
            ref = _noised(peft.get_peft_model(copy.deepcopy(base), ref_cfg()), prefix).eval()
            runners = [Runner("base", copy.deepcopy(base).eval(), train=False), Runner("unmerged", unmerged, train=False),
                       Runner("merged", merged, train=False), Runner("peft", ref, train=False)]
            del unmerged, merged, ref
            interleave(runners, ids, warmup + steps, cuda)
        except Exception as e:
            rows.append({"case": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            log(f"  {name} inference: {rows[-1]['error']}")
            continue
        row: dict[str, Any] = {"case": name, "batch": s["batch"], "seq": s["seq"], "base_s": runners[0].median(warmup)}
        for r in runners[1:]:
            row[r.label] = {"s": r.median(warmup), "vs_base": r.paired_ratio(runners[0], warmup)}
        rows.append(row)
        log(fmt_merge_row(row))
        del runners
        free()
    return rows


def fmt_merge_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['case']:<14} error: {row['error']}"
    return (f"{row['case']:<14} {row['batch']}x{row['seq']}: base {row['base_s'] * 1e3:8.1f} ms | ours merged "
            f"x{row['merged']['vs_base']:.3f} unmerged x{row['unmerged']['vs_base']:.3f} | peft unmerged "
            f"x{row['peft']['vs_base']:.3f} of the base forward")


def profile_step(base, s, name: str, log, out_path: Optional[str]) -> None:
    """Where one training step's time goes: torch.profiler tables for the limit, peftkit and peft."""
    import peft
    from torch.profiler import ProfilerActivity, profile

    import peftkit

    cuda = s["device"] == "cuda"
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0)).to(s["device"])
    ours_cfg, ref_cfg, env = method_configs(name)
    with env_vars(env):
        models = [("limit", frozen_limit(base)), ("ours", peftkit.get_peft_model(copy.deepcopy(base), ours_cfg())),
                  ("peft", peft.get_peft_model(copy.deepcopy(base), ref_cfg()))]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    texts = []
    for label, model in models:
        r = Runner(label, model, train=True, env=env if label == "ours" else None)
        for _ in range(2):
            r.step(ids, cuda)
        with profile(activities=acts, profile_memory=True) as prof:
            r.step(ids, cuda)
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        texts.append(f"=== {name} / {label}: {r.times[-1] * 1e3:.1f} ms\n{table}")
        short = prof.key_averages().table(sort_by=key, row_limit=10)
        log(f"=== profile {name} / {label}: {r.times[-1] * 1e3:.1f} ms")
        log("\n".join(line[:150] for line in short.splitlines()))
        del r
    if out_path:
        with open(out_path, "w") as f:
            f.write("\n\n".join(texts))
    del models
    free()


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPU shape (0.85B Llama, bf16, 8 x 1024)")
    ap.add_argument("--methods", default="all", help="comma-separated entries of METHODS, or 'all'")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (default: 10 GPU, 5 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per model (default: 3 GPU, 2 CPU)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000 GPU, 1024 CPU)")
    ap.add_argument("--profile", default=None, help="profile one training step of this method (limit, ours, peft)")
    ap.add_argument("--profile-out", default=None, help="write the full profiler tables here")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs; default 1, timed by CPU time)")
    ap.add_argument("--optimizer", choices=["default", "fused"], default="default",
                    help="AdamW implementation for every runner: torch's default, or the fused kernel")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-infer", action="store_true")
    ap.add_argument("--merge-infer-only", action="store_true",
                    help="only the merged/unmerged inference of (IA)^3 and LN tuning against the base forward")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    if args.gpu and not torch.cuda.is_available():
        print("--gpu given but torch sees no CUDA device; run without --gpu for the CPU shape.", file=sys.stderr)
        return 2
    s = shapes(args.gpu, args.vocab)
    if args.optimizer == "fused":
        OPTIMIZER_KW["fused"] = True
    if not args.gpu:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (3 if args.gpu else 2)
    steps = args.steps if args.steps is not None else (10 if args.gpu else 5)
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        print(f"unknown methods {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2

    import peft
    import transformers

    import peftkit

    def log(msg: str) -> None:
        print(msg, flush=True)

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "device": torch.cuda.get_device_name() if args.gpu else f"cpu x{torch.get_num_threads()} threads",
            "shape": {k: str(v) for k, v in s.items()}, "warmup": warmup, "steps": steps,
            "registered": peftkit.supported_methods(), "argv": sys.argv[1:]}
    log(json.dumps(info))
    base = build_base(s)
    if args.profile:
        try:
            profile_step(base, s, args.profile, log, args.profile_out)
        except Exception as e:  # profiling is a diagnostic; never lose the benchmark to it
            log(f"profile failed: {type(e).__name__}: {e}")
    result: dict[str, Any] = {"info": info}
    if not args.no_train and not args.merge_infer_only:
        result["train"] = bench_training(base, s, names, warmup, steps, log)
    if not args.no_infer and not args.merge_infer_only:
        result["infer"] = bench_inference(base, s, warmup, steps, log)
        result["infer_sublayer"] = bench_sublayer_inference(base, s, names, warmup, steps, log)
    if not args.no_infer:
        picked = [n for n in MERGE_INFER_METHODS if args.methods == "all" or n in names]
        result["infer_merged"] = bench_merge_inference(base, s, warmup, steps, log, picked)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    log("\n== summary (ratios: time, memory vs the frozen-base limit; ours/peft) ==")
    for row in result.get("train", []):
        log(fmt_train_row(row))
    for row in result.get("infer", []):
        if "error" not in row:
            log(f"{row['case']:<14} ours x{row['ours']['vs_base']:.2f} peft x{row['peft']['vs_base']:.2f} of base "
                f"forward ({row['batch']}x{row['seq']})")
    for row in result.get("infer_merged", []):
        log(fmt_merge_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
