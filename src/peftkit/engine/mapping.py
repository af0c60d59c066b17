"""``get_peft_model``: the entry point."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from peftkit.engine.config import PeftConfig
from peftkit.engine.peft_model import MODEL_TYPE_TO_PEFT_MODEL, PeftModel


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
    **kwargs,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``; the base weights are frozen.

    The returned model's class follows ``peft_config.task_type`` (e.g. ``PeftModelForCausalLM``), as in PEFT.
    ``autocast_adapter_dtype=False`` keeps the adapter in the base layers' dtype (default: float32 adapters on a
    float16/bfloat16 base). ``revision`` is recorded in the config.
    """
    if mixed:  # adapters of different methods on one model (LoRA + LoHa + ...), as PEFT's PeftMixedModel
        from peftkit.engine.mixed import PeftMixedModel

        if isinstance(model, PeftModel):
            raise ValueError("The model already is a PeftModel; use model.add_adapter(name, config) to add an adapter.")
        return PeftMixedModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
    if isinstance(peft_config, str):  # a config string, e.g. "seq_bn[reduction_factor=8]"
        from peftkit.engine.registry import config_from_string

        peft_config = config_from_string(peft_config)
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peftkit config (e.g. LoraConfig), got {type(peft_config).__name__}.")
    if isinstance(model, PeftModel):
        raise ValueError("The model already is a PeftModel; use model.add_adapter(name, config) to add an adapter.")
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(str(peft_config.task_type), PeftModel) if peft_config.task_type else PeftModel
    if revision is not None:
        import copy

        peft_config = copy.copy(peft_config)
        peft_config.revision = revision
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
