"""Worker of tests/test_wrapped_state_dict.py::test_fsdp_full_shard_two_ranks: FSDP v1 FULL_SHARD over 2 gloo
processes on CPU. Each rank writes what get_peft_model_state_dict returned (before and after a
set_peft_model_state_dict) and whether its adapter parameters were really sharded, to <out>/rank<r>.pt."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'store')}", rank=rank, world_size=2)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    import peftkit
    from test_wrapped_state_dict import _trained

    torch.set_num_threads(1)
    model = _trained(peftkit)
    full = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                   sharding_strategy=ShardingStrategy.FULL_SHARD)
    local = {n.replace("_fsdp_wrapped_module.", ""): p.numel() for n, p in wrapped.named_parameters()}
    sharded = any(local.get(n, 0) < size for n, size in full.items())
    got = peftkit.get_peft_model_state_dict(wrapped)
    peftkit.set_peft_model_state_dict(wrapped, {k: v * 2 for k, v in got.items()})
    after = peftkit.get_peft_model_state_dict(wrapped)
    torch.save({"got": got, "after_load": after, "sharded": sharded}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2, join=True)
