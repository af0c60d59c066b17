"""Worker of tests/test_distributed.py: run as ``python dist_worker.py OUT_DIR CASE[,CASE...]``.

Spawns 2 CPU processes (gloo). For each case (a method configuration on the tiny Llama) it trains the same adapter
three ways on the same global batch of 4 rows and writes what the test compares:

- ``ref.safetensors``: one process, the whole batch (rank 0 computes it);
- ``ddp_rank{r}.safetensors``: DistributedDataParallel, 2 rows per rank;
- FSDP2 (``fully_shard`` per decoder layer and the root), 2 rows per rank: ``fsdp_saved/`` is what
  ``save_pretrained`` wrote when called on every rank, ``fsdp_rank{r}.safetensors`` what
  ``get_adapter_state_dict`` gathered on each rank;
- ``loaded_out_rank{r}.safetensors``: a fresh model sharded with FSDP2, then the saved adapter loaded into it with
  ``load_adapter(folder, "default")``: its logits and its (gathered) adapter.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = 3
GLOBAL_BATCH = 4
WORLD = 2


def case_config(name: str):
    import peftkit

    tm = ["q_proj", "v_proj"]
    configs = {
        "lora": lambda: peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=tm),
        "dora": lambda: peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=tm, use_dora=True),
        "loha": lambda: peftkit.LoHaConfig(r=4, alpha=8, target_modules=tm),
        "lokr": lambda: peftkit.LoKrConfig(r=4, alpha=8, target_modules=tm),
        "oft": lambda: peftkit.OFTConfig(r=0, oft_block_size=8, target_modules=tm),
        "hra": lambda: peftkit.HRAConfig(r=4, target_modules=tm),
        "miss": lambda: peftkit.MissConfig(r=4, target_modules=tm),
        "boft": lambda: peftkit.BOFTConfig(boft_block_size=4, target_modules=tm),
        # the other two kinds of method: a sub-layer adapter (Pfeiffer) and a model-level prompt
        "seq_bn": lambda: peftkit.SeqBnConfig(reduction_factor=4),
        "prompt": lambda: peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "ia3": lambda: peftkit.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        # modules_to_save: a trained full copy of the head, sharded with the root
        "lora_mts": lambda: peftkit.LoraConfig(r=4, target_modules=tm, modules_to_save=["lm_head"]),
        # the other families: prompts on the keys/values, Llama-Adapter, a hybrid, a Compacter, LN tuning, AdaLoRA
        "prefix": lambda: peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "p_tuning": lambda: peftkit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
        "llama_adapter": lambda: peftkit.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
        "mam": lambda: peftkit.MAMConfig(prefix_length=4, bottleneck_size=16),
        "compacter": lambda: peftkit.CompacterConfig(reduction_factor=8),
        "ln_tuning": lambda: peftkit.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"]),
        # budget phase (masking) at steps 0-1, the final rank pattern fixed at step 2
        "adalora": lambda: peftkit.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, tinit=0, tfinal=1, deltaT=1,
                                                 total_step=STEPS, target_modules=tm),
    }
    return configs[name]()


def _build(case: str):
    import peftkit
    from models import MODELS

    base = MODELS["llama"].build()
    torch.manual_seed(11)  # the adapter's own init is the same on every rank and in the reference
    return base, peftkit.get_peft_model(copy.deepcopy(base), case_config(case))


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 96, (GLOBAL_BATCH, 8), generator=g)


def _train(model, ids, steps=STEPS):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine = getattr(model, "module", model).base_model
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(engine, "update_and_allocate"):  # AdaLoRA's budget step, after the optimiser step
            engine.update_and_allocate(step)
    model.eval()


def _state(model):
    import peftkit

    inner = getattr(model, "module", model)
    return {k: v.contiguous() for k, v in peftkit.get_adapter_state_dict(inner.base_model, "default").items()}


def _shard(peft_model):
    from torch.distributed.fsdp import fully_shard

    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
    return peft_model


def run_case(case: str, rank: int, out: str, ref_rank: int = 0) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    import peftkit

    os.makedirs(out, exist_ok=True)
    ids = _batch()
    mine = ids[rank * (GLOBAL_BATCH // WORLD):(rank + 1) * (GLOBAL_BATCH // WORLD)]

    if rank == ref_rank:  # one process (the ranks take turns, case by case, to share the work)
        _, ref = _build(case)
        _train(ref, ids)
        save_file(_state(ref), os.path.join(out, "ref.safetensors"))

    _, model = _build(case)
    ddp = DDP(model)
    _train(ddp, mine)
    save_file(_state(ddp), os.path.join(out, f"ddp_rank{rank}.safetensors"))

    _, model = _build(case)
    model = _shard(model)
    _train(model, mine)
    model.save_pretrained(os.path.join(out, "fsdp_saved"))  # on every rank: gathers, rank 0 writes
    # accelerate-style: is_main_process only on rank 0 (rank 1 must still take part in the gathering), and a
    # folder per rank, to see that only rank 0 writes
    model.save_pretrained(os.path.join(out, f"per_rank{rank}"), is_main_process=rank == 0)
    save_file(_state(model), os.path.join(out, f"fsdp_rank{rank}.safetensors"))
    dist.barrier()

    # load the saved (trained) adapter into a freshly sharded model whose adapter is still at its init
    base, fresh = _build(case)
    fresh = _shard(fresh)
    # into the existing adapter (as PEFT's load_adapter on a name the model has; AdaLoRA restores its pruned ranks)
    try:
        fresh.load_adapter(os.path.join(out, "fsdp_saved"), "default")
    except ValueError as e:  # a reparameterised prompt (P-tuning) cannot take a saved prompt once sharded
        if "reparameterisation network" not in str(e):
            raise
        with open(os.path.join(out, f"load_refused_rank{rank}.txt"), "w") as fh:
            fh.write(str(e))
        # what the error says to do: load first, then shard
        fresh = _shard(peftkit.PeftModel.from_pretrained(base, os.path.join(out, "fsdp_saved"), is_trainable=True))
    fresh.eval()
    with torch.no_grad():
        logits = fresh(input_ids=ids).logits
    loaded = _state(fresh)
    loaded["logits"] = logits.contiguous()
    save_file(loaded, os.path.join(out, f"loaded_out_rank{rank}.safetensors"))
    dist.barrier()


def run_accelerate(mode: str, rank: int, out: str) -> None:
    """``Accelerator().prepare`` (DDP: ``cpu=True``; FSDP2: its FSDP plugin, ``fsdp_version=2``), train, then
    ``unwrap_model(model).save_pretrained(..., is_main_process=accelerator.is_main_process)`` on every rank."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    if mode == "fsdp2":
        # accelerate picks FSDP only on accelerator devices (on CPU it falls back to DDP); set its FSDP2 plugin by
        # hand so that prepare() runs accelerate's own FSDP2 code (fully_shard per decoder layer and the root)
        from accelerate import PartialState

        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState re-reads it (prepare, save_model)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            reshard_after_forward=True)
    _, model = _build("lora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    kind = str(accelerator.distributed_type)
    ids = _batch()[rank * (GLOBAL_BATCH // WORLD):(rank + 1) * (GLOBAL_BATCH // WORLD)]
    model.train()
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    with open(os.path.join(out, f"kind_rank{rank}.txt"), "w") as fh:
        fh.write(f"{kind} {type(model).__name__} {type(next(unwrapped.parameters())).__name__}")
    unwrapped.save_pretrained(os.path.join(out, "saved"), is_main_process=accelerator.is_main_process)
    save_file(_state(unwrapped), os.path.join(out, f"gathered_rank{rank}.safetensors"))
    # accelerator.save_model: the adapter only, inside adapter_only_state_dict (state_dict() is whole outside it)
    target = os.path.join(out, "save_model")
    full_keys = len(unwrapped.state_dict())
    with unwrapped.adapter_only_state_dict(save_directory=target):
        inside = len(unwrapped.state_dict())
        accelerator.save_model(model, target)
    with open(os.path.join(out, f"state_dict_sizes_rank{rank}.txt"), "w") as fh:
        fh.write(f"{full_keys} {inside} {len(unwrapped.state_dict())}")
    accelerator.wait_for_everyone()


def run_deepspeed(stage: int, rank: int, out: str) -> None:
    """DeepSpeed ZeRO-``stage`` on CPU (gloo); ZeRO-3 partitions every parameter (base and adapter) at
    ``deepspeed.initialize``. ``save_pretrained`` on every rank
    gathers the partitioned adapter; the saved adapter is then loaded into a fresh engine's partitioned model."""
    import deepspeed
    from safetensors.torch import save_file

    import peftkit
    from models import MODELS

    os.makedirs(out, exist_ok=True)
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}

    def engine_model():
        # built as in the reference (under deepspeed.zero.Init, transformers' weight init would run on empty
        # partitions and give another base); deepspeed.initialize partitions every parameter for ZeRO-3
        base = MODELS["llama"].build()
        torch.manual_seed(11)
        model = peftkit.get_peft_model(base, case_config("lora"))
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        return engine, model

    engine, model = engine_model()
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    with open(os.path.join(out, f"kind_rank{rank}.txt"), "w") as fh:
        fh.write(f"{stage} {tuple(lora_a.shape)} {hasattr(lora_a, 'ds_id')}")
    ids = _batch()[rank * (GLOBAL_BATCH // WORLD):(rank + 1) * (GLOBAL_BATCH // WORLD)]
    engine.train()
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    model.save_pretrained(os.path.join(out, "saved"))
    save_file(_state(model), os.path.join(out, f"gathered_rank{rank}.safetensors"))
    dist_barrier()
    engine, fresh = engine_model()
    weights = peftkit.engine.io.load_tensors(os.path.join(out, "saved", "adapter_model.safetensors"))
    peftkit.set_adapter_state_dict(fresh.base_model, weights, "default")
    save_file(_state(fresh), os.path.join(out, f"loaded_rank{rank}.safetensors"))


def run_accelerate_deepspeed(stage: int, rank: int, out: str) -> None:
    """accelerate's DeepSpeed plugin (ZeRO-``stage``; on CPU: DeepSpeed's CPU accelerator, gloo), optimizer in the
    DeepSpeed config (accelerate's ``DummyOptim``). Saves with ``unwrap_model(model).save_pretrained`` and with
    ``accelerator.save_model`` inside ``adapter_only_state_dict``, on every rank."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
              "steps_per_print": 10**9}
    from accelerate import PartialState

    # On a machine without an accelerator, Accelerator(cpu=False) sees one process (no backend: LOCAL_RANK alone does
    # not make it distributed) and Accelerator(cpu=True) skips DeepSpeed; the process state made first with cpu=True
    # (gloo, both ranks) and the DeepSpeed plugin on top give DeepSpeed with the right ranks (see docs/distributed.md).
    PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    _, model = _build("lora")
    opt = DummyOptim([p for p in model.parameters() if p.requires_grad])
    engine, opt = accelerator.prepare(model, opt)
    unwrapped = accelerator.unwrap_model(engine)
    lora_a = next(p for n, p in unwrapped.named_parameters() if "lora_A" in n)
    with open(os.path.join(out, f"kind_rank{rank}.txt"), "w") as fh:
        fh.write(f"{accelerator.distributed_type} {type(engine).__name__} {stage} {tuple(lora_a.shape)} {accelerator.process_index} "
                 f"{hasattr(lora_a, 'ds_id')}")
    ids = _batch()[rank * (GLOBAL_BATCH // WORLD):(rank + 1) * (GLOBAL_BATCH // WORLD)]
    engine.train()
    for _ in range(STEPS):
        loss = engine(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    unwrapped.save_pretrained(os.path.join(out, "saved"), is_main_process=accelerator.is_main_process)
    save_file(_state(unwrapped), os.path.join(out, f"gathered_rank{rank}.safetensors"))
    target = os.path.join(out, "save_model")
    with unwrapped.adapter_only_state_dict(save_directory=target):
        accelerator.save_model(engine, target)
    accelerator.wait_for_everyone()
    # accelerate refuses a second Accelerator with a DeepSpeed plugin in one process: forget this one (test only)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def dist_barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def worker(rank: int, out: str, cases: list[str], port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for i, case in enumerate(cases):
            try:
                if case.startswith("accelerate_deepspeed_zero"):
                    run_accelerate_deepspeed(int(case[-1]), rank, os.path.join(out, case))
                elif case.startswith("deepspeed_zero"):
                    run_deepspeed(int(case[-1]), rank, os.path.join(out, case))
                elif case.startswith("accelerate_"):
                    run_accelerate(case.split("_", 1)[1], rank, os.path.join(out, case))
                else:
                    run_case(case, rank, os.path.join(out, case), ref_rank=i % WORLD)
            except Exception:
                with open(os.path.join(out, f"{case}.error_rank{rank}.txt"), "w") as fh:
                    fh.write(traceback.format_exc())
                raise
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # skip the interpreter's teardown: a background thread of gloo (or DeepSpeed) left joinable there can abort
    # the process ("terminate called without an active exception") after all the work succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    out, cases = sys.argv[1], sys.argv[2].split(",")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(out, cases, port), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
