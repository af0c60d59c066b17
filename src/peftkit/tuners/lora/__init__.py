"""PEFT's ``peft.tuners.lora``: peftkit's LoRA config, engine and layer classes under PEFT's names
(``isinstance(layer, peftkit.tuners.lora.LoraLayer)`` is true for every peftkit LoRA layer)."""

from peftkit.tuners.lora import config, layer, model  # noqa: F401
from peftkit.tuners.lora.config import LoraConfig
from peftkit.tuners.lora.layer import Conv1d, Conv2d, Conv3d, ConvNd, Embedding, Linear, LoraLayer
from peftkit.tuners.lora.model import LoraModel

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvNd", "Embedding", "Linear", "LoraConfig", "LoraLayer", "LoraModel"]
