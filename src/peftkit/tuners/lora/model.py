"""PEFT's ``peft.tuners.lora.model``: peftkit's :class:`LoraModel`."""

from peftkit.methods.lora.lora import LoraModel

__all__ = ["LoraModel"]
