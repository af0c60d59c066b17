"""Kill a process saving a large adapter at random moments and check what the folder holds afterwards.

    python benchmarks/crash_kill.py --kills 30 --layers 28 --dim 1024 --rank 512   # a 112 MB adapter

Each round forks a child that saves generations 1, 2, ... of the adapter (each with its own weights and
lora_alpha) in a loop into one folder, and SIGKILLs it after a random delay. The folder must then load as exactly
one generation (config and weights of the same save). Prints the counts and the bytes left behind by killed saves
before the next save cleans them. Linux only (fork).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import tempfile
import time

import torch
import torch.nn as nn

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.engine.io import SAFETENSORS_NAME


def build(layers: int, dim: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(dim, dim, bias=False) for _ in range(layers)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--max-delay", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [str(i) for i in range(args.layers)]
    gens = []
    for g in range(3):
        model = get_peft_model(build(args.layers, args.dim),
                               LoraConfig(r=args.rank, lora_alpha=g + 1, target_modules=names, init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.001 * (g + 1))  # generation g: every B entry is 0.001 * (g + 1)
        gens.append(model)
    work = tempfile.mkdtemp(prefix="crash-kill-")
    path = os.path.join(work, "adapter")
    gens[0].save_pretrained(path)
    size = os.path.getsize(os.path.join(path, SAFETENSORS_NAME))
    rng = random.Random(args.seed)
    good, bad, leftover_bytes, outcomes = 0, 0, 0, {}
    t0 = time.time()
    for _ in range(args.kills):
        pid = os.fork()
        if pid == 0:
            try:
                g = 1
                while True:
                    gens[g].save_pretrained(path)
                    g = 3 - g
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, args.max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leftover_bytes += sum(
            os.path.getsize(os.path.join(d, f))
            for n in os.listdir(work) if ".peftkit-new-" in n or ".peftkit-old-" in n
            for d, _, fs in os.walk(os.path.join(work, n)) for f in fs
        )
        try:
            loaded = PeftModel.from_pretrained(build(args.layers, args.dim), path)
            g = int(loaded.peft_config["default"].lora_alpha) - 1
            ok = all(bool((p == 0.001 * (g + 1)).all()) for n, p in loaded.named_parameters() if "lora_B" in n)
        except Exception as exc:  # a folder that does not load counts as lost
            ok, g = False, f"error: {type(exc).__name__}"
        outcomes[g] = outcomes.get(g, 0) + 1
        good += ok
        bad += not ok
    shutil.rmtree(work, ignore_errors=True)
    print(f"adapter {size / 1e6:.0f} MB, {args.kills} kills in {time.time() - t0:.0f} s: {good} folders loaded as exactly "
          f"one generation, {bad} did not; generations seen {outcomes}; bytes left by killed saves (removed by the "
          f"next save) {leftover_bytes / 1e6:.0f} MB in total")


if __name__ == "__main__":
    main()
