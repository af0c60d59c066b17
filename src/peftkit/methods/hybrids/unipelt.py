"""UniPELT (Mao et al., 2022), with AdapterHub ``adapters`` 1.3's names, defaults and gate semantics:
``UniPELTConfig()`` = prefix tuning (10 tokens, bottleneck 512) + a sequential bottleneck adapter after the
feed-forward block (``SeqBnConfig``, reduction 16) + LoRA on the attention query and value (r 8), each behind a
learned gate ``g = mean_seq(sigmoid(Linear(in, 1)(input)))`` (a scalar per example):

- bottleneck: ``A(z) * g(z)``, z the adapter's input;
- LoRA: ``x A^T B^T * g(x)``; the gate *replaces* lora_alpha / r (so AdapterHub's alpha=2 has no effect);
- prefix: one gate per layer on the self-attention input scales that layer's prefix keys and values.

Gate init as AdapterHub: weights N(0, 0.02); bias 0 for the bottleneck gate, PyTorch's default for the others.

Identity at init: **no**, by default (as in AdapterHub): the bottleneck adapter's "bert" init (N(0, 0.02) on both
projections) and the prefix change the output; LoRA starts at zero. Gates start near 0.5, not closed. A closed-gate
start is not AdapterHub's default and is not offered here. Closed gates (sigmoid -> 0) switch the adapter and LoRA off
but leave zero prefix keys/values, which still take attention weight: not the base model either.

The gates average over the tokens of each call (padding included), as in AdapterHub: the model is not causal, and a
cached generation step is gated by its new token alone.

On GPT-2's fused ``c_attn`` the LoRA is AdapterHub's ``LoRAMergedLinear``: factors and a gate output of their own
for the q and the v thirds (``GatedLoraConfig.fused_qkv_matrices``), the k third untouched. On T5 the LoRA is on q and
v of every attention (cross-attention included) and the prefix in all three places (see ``engine/hybrid.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peftkit.engine.config import PeftType
from peftkit.engine.hybrid import HybridConfig, HybridModel, PrefixSpec, check_adapterhub_component
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.methods.adapters.bottleneck import SeqBnConfig
from peftkit.methods.lora.lora import LoraConfig


@dataclass
class GatedLoraConfig(LoraConfig):
    """LoRA with AdapterHub's gate (the component of UniPELT; the gate replaces lora_alpha / r)."""

    use_gating: bool = True
    # AdapterHub's LoRA on a fused q/k/v projection (GPT-2's c_attn) adapts only these matrices' thirds, each with its
    # own factors (and gate); separate q/k/v projections are targeted by name instead
    fused_qkv_matrices: Optional[list[str]] = field(default_factory=lambda: ["q", "v"])


@dataclass
class UniPELTConfig(HybridConfig):
    """AdapterHub's ``UniPELTConfig``: gated prefix + gated sequential bottleneck adapter + gated LoRA."""

    prefix_length: int = field(default=10, metadata={"help": "Prefix tokens per layer."})
    bottleneck_size: int = field(default=512, metadata={"help": "Width of the prefix MLP."})
    reduction_factor: float = field(default=16, metadata={"help": "hidden / bottleneck adapter width."})
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=2, metadata={"help": "LoRA alpha (no effect: the gate replaces alpha / r, as in AdapterHub)."})
    lora_target_modules: Optional[list[str]] = field(default=None, metadata={"help": "LoRA targets (default: the attention query and value)."})
    use_gating: bool = field(default=True, metadata={"help": "Gates on all three components (AdapterHub's UniPELT)."})

    def __post_init__(self) -> None:
        self.peft_type = PeftType.UNIPELT
        super().__post_init__()
        for name in ("prefix_length", "bottleneck_size", "r"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UniPELTConfig.{name} must be a positive integer, got {v!r}.")
        self.layer_components()

    def layer_components(self) -> list:
        targets = list(self.lora_target_modules) if self.lora_target_modules else None
        return [GatedLoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=targets, use_gating=self.use_gating),
                SeqBnConfig(reduction_factor=self.reduction_factor, use_gating=self.use_gating)]

    def prefix_component(self) -> PrefixSpec:
        return PrefixSpec(self.prefix_length, self.bottleneck_size, use_gating=self.use_gating)

    def adapterhub_dict(self) -> dict:
        # AdapterHub's order: prefix, bottleneck adapter, LoRA
        out = super().adapterhub_dict()
        out["configs"] = [out["configs"][0], out["configs"][2], out["configs"][1]]
        return out

    def adapterhub_component(self, comp) -> dict:
        if self.lora_target_modules:
            raise ValueError("UniPELTConfig with lora_target_modules cannot be written in AdapterHub's format "
                             "(AdapterHub's LoRA targets are attn_matrices ['q', 'v']).")
        return {"alpha": self.alpha, "architecture": "lora", "attn_matrices": ["q", "v"], "composition_mode": "add",
                "dropout": 0.0, "dtype": None, "init_weights": "lora", "init_weights_seed": None,
                "intermediate_lora": False, "leave_out": [], "output_lora": False, "r": self.r, "selfattn_lora": True,
                "use_dora": False, "use_gating": self.use_gating, "vera_b": None, "vera_d": None}

    @classmethod
    def from_adapterhub(cls, configs: list) -> "UniPELTConfig | None":
        kinds = [c.get("architecture", "bottleneck") for c in configs]
        if sorted(kinds) != ["bottleneck", "lora", "prefix_tuning"]:
            return None
        prefix, bn, lora = (configs[kinds.index(k)] for k in ("prefix_tuning", "bottleneck", "lora"))
        gating = {bool(c.get("use_gating")) for c in (prefix, bn, lora)}
        if len(gating) != 1:
            raise ValueError("This AdapterHub union of prefix tuning, a bottleneck adapter and LoRA gates only some "
                             "components; peftkit's UniPELTConfig gates all three or none (use_gating).")
        config = cls(prefix_length=prefix["prefix_length"], bottleneck_size=prefix["bottleneck_size"],
                     reduction_factor=bn["reduction_factor"], r=lora["r"], alpha=lora["alpha"],
                     use_gating=gating.pop())
        check_adapterhub_component("prefix_tuning", prefix, dict(flat=False, non_linearity="tanh", dropout=0.0,
                                                                 leave_out=[], shared_gating=True))
        check_adapterhub_component("bottleneck", bn, config.layer_components()[1].adapterhub_dict())
        check_adapterhub_component("lora", lora, dict(attn_matrices=["q", "v"], selfattn_lora=True,
                                                      intermediate_lora=False, output_lora=False, dropout=0.0,
                                                      composition_mode="add", init_weights="lora", leave_out=[],
                                                      use_dora=False))
        return config


UNIPELT = register_method(MethodSpec(peft_type=PeftType.UNIPELT.value, config_cls=UniPELTConfig,
                                     create_layer=lambda *a, **k: None, prefix="adapters_", model_cls=HybridModel,
                                     supports_mixed_batch=False, supports_merge=False))
