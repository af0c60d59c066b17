"""transformers ``Trainer`` without ``peft`` installed.

With ``peft`` installed, ``Trainer`` recognises peftkit models (:mod:`peftkit.integrations.peft_compat`): checkpoints
and ``save_model`` hold only the adapter, ``resume_from_checkpoint`` and ``load_best_model_at_end`` reload it with
``model.load_adapter``. Without peft, ``Trainer`` treats every model it does not know as a plain module: checkpoints
hold the whole state dict (``model.safetensors``), which still resumes exactly. :class:`PeftkitCallback` adds the
adapter (``adapter_config.json`` + ``adapter_model.safetensors``, the PEFT format) to every checkpoint folder::

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[PeftkitCallback()])
    trainer.train()
    peft_model.save_pretrained("out/adapter")   # the final adapter (save_model writes the whole state dict)
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch.nn as nn


def _no_event(*args: Any, **kwargs: Any) -> None:
    return None


def find_peft_model(model: Optional[nn.Module]) -> Any:
    """The peftkit PeftModel that is ``model`` or that a wrapper (DDP, accelerate, torch.compile) holds."""
    from peftkit.engine.peft_model import PeftModel

    seen = model
    for _ in range(8):
        if isinstance(seen, PeftModel):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            break
        seen = inner
    raise ValueError(
        f"PeftkitCallback found no peftkit PeftModel in {type(model).__name__}; pass the model returned by "
        "peftkit.get_peft_model to the Trainer."
    )


class PeftkitCallback:
    """A ``transformers.TrainerCallback`` (by protocol: importing peftkit does not import the trainer module) that
    writes the adapter into each checkpoint folder ``<output_dir>/checkpoint-<step>`` that has none."""

    def on_save(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if not getattr(args, "should_save", True):
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "adapter_config.json")):
            return
        find_peft_model(model).save_pretrained(folder)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _no_event
        raise AttributeError(name)
