"""PEFT's ``peft.tuners.lora.config``: peftkit's :class:`LoraConfig`."""

from peftkit.methods.lora.lora import LoraConfig

__all__ = ["LoraConfig"]
