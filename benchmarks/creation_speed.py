"""How long ``get_peft_model`` takes on a mid-size Llama, peftkit vs Hugging Face PEFT, in one process.

    python benchmarks/creation_speed.py [--hidden 1024 --layers 8 --rank 16 --targets all-linear --repeats 5]

Builds the model once from a config (random weights), then, interleaved per repeat, wraps a fresh copy with each
library and prints the median wall time and the ratio. A benchmark print, not a test.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or a comma-separated list")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"Llama hidden={args.hidden} layers={args.layers}: {n_params / 1e6:.1f}M parameters; LoRA r={args.rank} "
          f"on {args.targets}; torch {torch.__version__}, peft {peft.__version__}, {args.threads} threads")

    times: dict[str, list[float]] = {"peftkit": [], "peft": []}
    for _ in range(args.repeats):
        for name, lib in (("peftkit", peftkit), ("peft", peft)):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            wrapped = lib.get_peft_model(model, lib.LoraConfig(r=args.rank, target_modules=targets))
            times[name].append(time.perf_counter() - start)
            del wrapped, model
    ours, theirs = statistics.median(times["peftkit"]), statistics.median(times["peft"])
    print(f"get_peft_model median of {args.repeats}: peftkit {ours * 1e3:.1f} ms, peft {theirs * 1e3:.1f} ms, "
          f"ratio peftkit/peft {ours / theirs:.2f}")

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    start = time.perf_counter()
    meta_model = peftkit.get_peft_model(skeleton, peftkit.LoraConfig(r=args.rank, target_modules=targets))
    print(f"peftkit on a meta-device model: {(time.perf_counter() - start) * 1e3:.1f} ms "
          f"({meta_model.get_nb_trainable_parameters()[0]:,} adapter parameters, no memory for weights)")


if __name__ == "__main__":
    main()
