"""MAM adapters (He et al., 2022, "Towards a unified view of parameter-efficient transfer learning"), with AdapterHub
``adapters`` 1.3's names and defaults: ``MAMConfig()`` = prefix tuning (30 tokens, bottleneck 800) + a parallel
bottleneck adapter beside the feed-forward block (``ParBnConfig``: reduction 2, scaling 4, zero-initialised up).

A composition over :mod:`peftkit.engine.hybrid`: the adapter is peftkit's :class:`ParBnConfig` bottleneck adapter and an
AdapterHub-layout prefix. Not the identity at init (the prefix), as in AdapterHub; the parallel adapter alone is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from peftkit.engine.config import PeftType
from peftkit.engine.hybrid import HybridConfig, HybridModel, PrefixSpec, check_adapterhub_component
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.methods.adapters.bottleneck import ParBnConfig


@dataclass
class MAMConfig(HybridConfig):
    """AdapterHub's ``MAMConfig``: prefix (``prefix_length``, ``bottleneck_size``) + parallel adapter
    (``reduction_factor``, ``scaling``, ``non_linearity``) after the feed-forward block."""

    prefix_length: int = field(default=30, metadata={"help": "Prefix tokens per layer."})
    bottleneck_size: int = field(default=800, metadata={"help": "Width of the prefix MLP."})
    reduction_factor: float = field(default=2, metadata={"help": "hidden / parallel adapter width."})
    scaling: Union[float, str] = field(default=4.0, metadata={"help": "Parallel adapter scaling (number, 'learned', 'channel')."})
    non_linearity: str = field(default="relu", metadata={"help": "Parallel adapter activation."})
    leave_out: list[int] = field(default_factory=list, metadata={"help": "Layers without the parallel adapter."})

    def __post_init__(self) -> None:
        self.peft_type = PeftType.MAM
        super().__post_init__()
        for name in ("prefix_length", "bottleneck_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MAMConfig.{name} must be a positive integer, got {v!r}.")
        self.layer_components()  # validate the adapter fields now, with ParBnConfig's messages

    def layer_components(self) -> list:
        return [ParBnConfig(reduction_factor=self.reduction_factor, scaling=self.scaling,
                            non_linearity=self.non_linearity, leave_out=list(self.leave_out))]

    def prefix_component(self) -> PrefixSpec:
        return PrefixSpec(self.prefix_length, self.bottleneck_size)

    @classmethod
    def from_adapterhub(cls, configs: list) -> "MAMConfig | None":
        kinds = [c.get("architecture", "bottleneck") for c in configs]
        if sorted(kinds) != ["bottleneck", "prefix_tuning"]:
            return None
        prefix = configs[kinds.index("prefix_tuning")]
        bn = configs[kinds.index("bottleneck")]
        if not bn.get("is_parallel") or bn.get("mh_adapter") or prefix.get("use_gating") or bn.get("use_gating"):
            return None  # another union of a prefix and a bottleneck adapter
        config = cls(prefix_length=prefix["prefix_length"], bottleneck_size=prefix["bottleneck_size"],
                     reduction_factor=bn["reduction_factor"], scaling=bn["scaling"], non_linearity=bn["non_linearity"],
                     leave_out=list(bn.get("leave_out") or []))
        check_adapterhub_component("prefix_tuning", prefix, dict(flat=False, non_linearity="tanh", dropout=0.0, leave_out=[]))
        check_adapterhub_component("bottleneck", bn, config.layer_components()[0].adapterhub_dict())
        return config


MAM = register_method(MethodSpec(peft_type=PeftType.MAM.value, config_cls=MAMConfig, create_layer=lambda *a, **k: None,
                                 prefix="adapters_", model_cls=HybridModel, supports_mixed_batch=False,
                                 supports_merge=False))
