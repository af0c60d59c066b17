"""LoRA and the methods built on its layers: AdaLoRA, X-LoRA."""
