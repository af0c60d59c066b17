"""Peak memory of LoRA training on a 4-bit (bitsandbytes NF4, double quantisation: QLoRA) base against the same
LoRA on the fp32 base, peftkit and Hugging Face PEFT side by side in the same run.

Model: Llama-shaped, random weights, hidden 1024, 8 layers, MLP 2816, 16 heads, vocabulary 8192 (small, so
that the linear weights, which 4-bit quantises, dominate), saved once to a temporary folder and loaded by
transformers with and without ``BitsAndBytesConfig``. LoRA r=16 on every linear of the decoder layers, AdamW,
batch 1 x 128, 3 steps.

Each (library, base) pair runs in a fresh process. Memory:
- CPU: torch's own accounting, which has no allocator statistics there: the bytes of every tensor alive
  before the steps (weights, quantisation state) plus the highest running total of CPU allocations minus frees
  that ``torch.profiler`` (``profile_memory=True``) records during the steps (activations, gradients, optimizer
  state, transient dequantised weights). The process's resident set is also printed, but it is not a fair
  measure here: after loading a quantised model the safetensors file stays mapped and its touched pages count
  as resident, and freed heap is not returned to the system;
- GPU (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the training steps, less what was allocated
  before loading.

    python benchmarks/qlora_memory.py                  # CPU
    python benchmarks/qlora_memory.py --device cuda    # GPU
    python benchmarks/qlora_memory.py --json out.json

This is a benchmark, not a test: nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1))


def build(folder: str, vocab: int = 8192) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def run(folder: str, lib: str, base: str, device: str, steps: int) -> dict:
    import torch
    import transformers

    import gc

    torch.set_num_threads(1)
    start = torch.cuda.memory_allocated() if device == "cuda" else _rss_kib("VmRSS") * 1024
    kwargs = {"dtype": torch.float32, "device_map": device}
    if base == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if lib == "peftkit":
        import peftkit as pk
    else:
        import peft as pk
    if base == "nf4":
        model = pk.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = pk.get_peft_model(model, pk.LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
    model.train()
    gc.collect()
    # the peak is taken over the training steps (loading may pass through full-precision tensors transiently)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() - start
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        resident = _rss_kib("VmRSS") * 1024 - start
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0)).to(device)
    live = _live_tensor_bytes(device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) if device == "cpu" else _nothing() as prof:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    out = {"lib": lib, "base": base, "device": device, "loss": float(loss)}
    if device == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - start
    else:
        # torch's own accounting: the tensors alive before the steps plus the highest running total of the
        # CPU allocations (minus frees) the profiler saw during them
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        running = high = 0
        for e in events:
            running += e.nbytes()
            high = max(high, running)
        out["peak_bytes"] = live + high
        out["rss_peak_bytes"] = _rss_kib("VmHWM") * 1024 - start
        out["rss_after_load_bytes"] = resident
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _live_tensor_bytes(device: str) -> int:
    """Bytes of the distinct storages of every tensor alive on ``device`` (weights, quantisation state, buffers)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != device:
                continue
            st = obj.untyped_storage()
        except Exception:
            continue
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--libs", default="peftkit,peft")
    ap.add_argument("--json", default=None)
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size (Llama's own: 32000)")
    ap.add_argument("--_child", nargs=3, metavar=("FOLDER", "LIB", "BASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        folder, lib, base = args._child
        print(json.dumps(run(folder, lib, base, args.device, args.steps)))
        return
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                        f"import qlora_memory; qlora_memory.build({folder!r}, {args.vocab})"], check=True)
        results = []
        for lib in args.libs.split(","):
            for base in ("fp32", "nf4"):
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
                                      "--_child", folder, lib, base], check=True, capture_output=True, text=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = results[-1]
                rss = f"  (process RSS peak {r['rss_peak_bytes'] / 2**20:7.1f} MiB)" if "rss_peak_bytes" in r else ""
                print(f"{lib:8s} {base:5s} peak {r['peak_bytes'] / 2**20:8.1f} MiB{rss}  loss {r['loss']:.3f}",
                      flush=True)
    by = {(r["lib"], r["base"]): r["peak_bytes"] for r in results}
    for lib in args.libs.split(","):
        print(f"{lib:8s} nf4 / fp32 peak: {by[(lib, 'nf4')] / by[(lib, 'fp32')]:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
