"""A user-style accelerate training script: ``accelerate launch --config_file CFG tests/accelerate_script.py OUT``
on GPUs; on CPU ``ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 tests/accelerate_script.py OUT``
(what tests/test_accelerate_launch.py runs).

Tiny Llama, LoRA on q/v, 3 AdamW steps on this rank's half of a fixed batch of 4 rows; then, on every process,
``unwrap_model(model).save_pretrained`` (OUT/saved) and ``accelerator.save_model`` inside
``adapter_only_state_dict`` (OUT/save_model). Writes OUT/kind_rank{r}.txt: distributed type, model class,
parameter class.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(out: str) -> None:
    from accelerate import Accelerator

    import peftkit
    from models import MODELS

    accelerator = Accelerator()
    base = MODELS["llama"].build()
    torch.manual_seed(11)
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(5))
    ids = ids[rank * (4 // world):(rank + 1) * (4 // world)]
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"kind_rank{rank}.txt"), "w") as fh:
        fh.write(f"{accelerator.distributed_type} {type(model).__name__} {type(next(unwrapped.parameters())).__name__}")
    unwrapped.save_pretrained(os.path.join(out, "saved"), is_main_process=accelerator.is_main_process)
    with unwrapped.adapter_only_state_dict(save_directory=os.path.join(out, "save_model")):
        accelerator.save_model(model, os.path.join(out, "save_model"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
