"""PEFT's ``peft.tuners.lora.layer``: peftkit's LoRA layer classes under PEFT's names."""

from peftkit.methods.lora.lora import Conv1d, Conv2d, Conv3d, ConvNd, Embedding, Linear, LoraLayer

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvNd", "Embedding", "Linear", "LoraLayer"]
