"""Training-step time of OFT, BOFT and HRA: peftkit against Hugging Face PEFT and the frozen-base limit.

One process, one random-init Llama (hidden 256, 4 layers, MLP 688, batch 4 x 128 tokens, fp32 by default); every
variant's step (forward, backward, AdamW) is timed in turn, round after round, so machine load hits all variants
alike; the median per variant is reported, also as a ratio to the frozen base (every weight frozen, input gradients
on) and ours against PEFT's.

    python benchmarks/orthogonal_cpu.py                 # CPU, the issue's configs
    python benchmarks/orthogonal_cpu.py --vocab 32000 --rounds 15
    python benchmarks/orthogonal_cpu.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --mlp 5632
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 32)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max(256, args.seq))
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=getattr(torch, args.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # gradients flow through every layer even with all weights frozen
    return model


def variants(base: torch.nn.Module, methods: list[str]) -> dict[str, torch.nn.Module]:
    import peft

    import peftkit

    configs = {
        "oft": ("OFTConfig", dict(oft_block_size=32, target_modules="all-linear")),
        "boft": ("BOFTConfig", dict(boft_block_size=4, target_modules=["q_proj", "v_proj"])),
        "hra": ("HRAConfig", dict(r=8, target_modules="all-linear")),
    }
    out = {"frozen": copy.deepcopy(base)}
    for m in methods:
        cls, kwargs = configs[m]
        out[f"peftkit-{m}"] = peftkit.get_peft_model(copy.deepcopy(base), getattr(peftkit, cls)(**copy.deepcopy(kwargs)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[f"peft-{m}"] = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**copy.deepcopy(kwargs)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="oft,boft,hra")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="'process': CPU time of this process (use with --threads 1 on a machine shared with other "
                         "jobs, where wall time mostly measures the others)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = build_base(args)
    models = variants(base, [m for m in args.methods.split(",") if m])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    opts = {}
    for name, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opts[name] = torch.optim.AdamW(params, lr=1e-4) if params else None

    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def step(name: str) -> float:
        model, opt = models[name], opts[name]
        if args.device != "cpu":
            torch.cuda.synchronize()
        t = clock()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.device != "cpu":
            torch.cuda.synchronize()
        return clock() - t

    times: dict[str, list[float]] = {n: [] for n in models}
    for r in range(args.warmup + args.rounds):
        for name in models:
            dt = step(name)
            if r >= args.warmup:
                times[name].append(dt)
    med = {n: statistics.median(v) for n, v in times.items()}
    frozen = med["frozen"]
    print(f"Llama hidden {args.hidden}, {args.layers} layers, MLP {args.mlp}, vocab {args.vocab}, batch "
          f"{args.batch}x{args.seq}, {args.dtype} on {args.device}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"median of {args.rounds} interleaved steps (torch {torch.__version__})")
    print(f"{'variant':<16}{'step s':>10}{'/ frozen':>10}{'ours / peft':>13}")
    for name, t in med.items():
        rel = ""
        if name.startswith("peftkit-"):
            rel = f"{t / med['peft-' + name.split('-', 1)[1]]:.2f}"
        print(f"{name:<16}{t:>10.4f}{t / frozen:>10.2f}{rel:>13}")


if __name__ == "__main__":
    main()
