"""AdapterHub's prefix tuning on its own (``adapters.PrefixTuningConfig``), the prefix component of the hybrids.

peftkit's :class:`~peftkit.methods.prompts.prefix_tuning.PrefixTuningConfig` is Hugging Face PEFT's method (its
names, checkpoint layout and position handling). AdapterHub's differs: its MLP reads a (prefix_length, hidden) table
(not kv_heads * head_dim wide), the real tokens keep positions 0, 1, ..., and its folders hold the MLP itself. This
config is what an AdapterHub ``prefix_tuning`` folder loads as, so that it gives AdapterHub's outputs; it is a hybrid
with a prefix and no layer components.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.engine.config import PeftType
from peftkit.engine.hybrid import HybridConfig, HybridModel, PrefixSpec, check_adapterhub_component
from peftkit.engine.registry import MethodSpec, register_method


@dataclass
class AdapterHubPrefixTuningConfig(HybridConfig):
    """AdapterHub's ``PrefixTuningConfig`` (``prefix_length``, ``bottleneck_size``, ``use_gating``)."""

    prefix_length: int = field(default=30, metadata={"help": "Prefix tokens per layer."})
    bottleneck_size: int = field(default=512, metadata={"help": "Width of the prefix MLP."})
    use_gating: bool = field(default=False, metadata={"help": "A learned gate per layer on the prefix (UniPELT's)."})

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADAPTERHUB_PREFIX_TUNING
        super().__post_init__()
        for name in ("prefix_length", "bottleneck_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AdapterHubPrefixTuningConfig.{name} must be a positive integer, got {v!r}.")

    def layer_components(self) -> list:
        return []

    def prefix_component(self) -> PrefixSpec:
        return PrefixSpec(self.prefix_length, self.bottleneck_size, use_gating=self.use_gating)

    @classmethod
    def from_adapterhub(cls, configs: list) -> "AdapterHubPrefixTuningConfig | None":
        if [c.get("architecture") for c in configs] != ["prefix_tuning"]:
            return None
        prefix = configs[0]
        check_adapterhub_component("prefix_tuning", prefix, dict(flat=False, non_linearity="tanh", dropout=0.0,
                                                                 leave_out=[], shared_gating=True))
        return cls(prefix_length=prefix.get("prefix_length", 30), bottleneck_size=prefix.get("bottleneck_size", 512),
                   use_gating=bool(prefix.get("use_gating")))


AH_PREFIX_TUNING = register_method(MethodSpec(
    peft_type=PeftType.ADAPTERHUB_PREFIX_TUNING.value, config_cls=AdapterHubPrefixTuningConfig,
    create_layer=lambda *a, **k: None, prefix="prefix_tuning", model_cls=HybridModel, supports_mixed_batch=False,
    supports_merge=False))
