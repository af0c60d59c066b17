"""HRA: Householder reflection adaptation (Yuan et al., 2024).

Each adapted layer learns r vectors u_i (``hra_u``: (d, r), d = in_features or in_channels * kh * kw) and
multiplies its weight by the chain of reflections ``H = H_0 H_1 ... H_{r-1}``, ``H_i = I - 2 u_i u_i^T / |u_i|^2``:
``W' = W H``. With ``apply_GS`` the planes are orthonormalised first and ``H = I - 2 Q Q^T``. Names, shapes and
math follow Hugging Face PEFT.

Unmerged linear layers never build H: ``x H^T = x - (x U) T^T U^T`` with the r x r triangular factor T of the
compact WY form, two thin products per step. :func:`orthogonality_loss` is the paper's regulariser
``lambda * sum ||U^T U - I||_F^2`` over the reflection planes, to add to the training loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.validation import SCALE_LIMIT, Rule
from peftkit.engine.layer import AdapterLayer, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.engine.tuner import AdapterModel
from peftkit.methods.orthogonal import orthogonal_ops as ops
from peftkit.methods.common import adapter_dtype
from peftkit.methods.orthogonal.oft import DEFAULT_TARGETS, OrthogonalLayer, check_bias

logger = logging.getLogger(__name__)


@dataclass
class HRAConfig(TargetedConfig):
    """Configuration of HRA adapters; field names, defaults and meanings follow Hugging Face PEFT."""

    r: int = field(default=8, metadata={"help": "Number of Householder reflections; even r starts at the identity."})
    apply_GS: bool = field(default=False, metadata={"help": "Orthonormalise the reflection planes (Gram-Schmidt)."})
    init_weights: bool = field(default=True, metadata={"help": "True: pairs of equal reflections (identity at "
                                                          "start, needs an even r); False: random."})
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'hra_only'."})

    field_rules: ClassVar[dict[str, Rule]] = {"r": Rule(min=1)}

    def __post_init__(self) -> None:
        self.peft_type = PeftType.HRA
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"HRAConfig.r must be a positive integer, got {self.r!r}.")
        if self.init_weights not in (True, False):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}.")
        check_bias(self.bias, "hra")


class HRALayer(OrthogonalLayer):
    """HRA on ``nn.Linear`` (reflections applied to the input) and ``nn.Conv2d`` (to the flattened filters)."""

    adapter_slots = ("hra_u",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hra_u = nn.ParameterDict()
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}

    def update_layer(self, adapter_name: str, config: HRAConfig, module_name: str = "", loading: bool = False) -> None:
        r = config.r
        if r > self.rot_dim:
            raise ValueError(f"HRA: r={r} is larger than {module_name or 'the layer'}'s dimension {self.rot_dim}; "
                             "use r <= the input dimension.")
        w = self.get_base_layer().weight
        u = torch.empty(self.rot_dim, r, device=w.device, dtype=adapter_dtype(w))
        if loading:
            nn.init.ones_(u)  # overwritten by the checkpoint; must only be finite and non-zero
        elif config.init_weights and r % 2 == 0:
            # each vector twice in a row: H_i H_i = I, so the chain starts as the identity
            half = torch.empty(self.rot_dim, r // 2, dtype=torch.float32)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u.copy_(torch.repeat_interleave(half, 2, dim=1))
        else:
            if config.init_weights:
                logger.warning("HRA: r=%d is odd, so the symmetric (identity) initialisation is impossible; the "
                               "reflections start random and the adapter changes the output from the start.", r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        if config.apply_GS and config.init_weights and not loading:
            logger.warning("HRA: apply_GS=True with the paired identity initialisation orthonormalises rounding noise "
                           "(as in PEFT): the adapter does not start as the identity. Consider init_weights=False.")
        self.hra_u[adapter_name] = nn.Parameter(u)
        self.hra_r[adapter_name] = r
        self.hra_apply_GS[adapter_name] = bool(config.apply_GS)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.hra_r.pop(adapter_name, None)
        self.hra_apply_GS.pop(adapter_name, None)

    # The input-side matrix is R = H^T (so that W' = W R^T = W H).
    def _rotation(self, name: str) -> torch.Tensor:
        return ops.householder_dense(self.hra_u[name], self.hra_apply_GS[name], transpose=True)

    def _rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return ops.householder_rotate_input(x, self.hra_u[name], self.hra_apply_GS[name])

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "linear" and len(names) == 1 and not self.hra_apply_GS[names[0]]:
            # one adapter: fold the reflections into W for the forward GEMM, thin products in backward
            base = self.get_base_layer()
            return ops.householder_linear(x, self.hra_u[names[0]], base.weight, base.bias)
        return super().forward_adapters(x, names, *args, **kwargs)

    def _inverse_rotation(self, name: str) -> torch.Tensor:
        return ops.householder_dense(self.hra_u[name], self.hra_apply_GS[name], transpose=False)

    def orthogonality_loss(self, names: Optional[Sequence[str]] = None) -> torch.Tensor:
        names = self.active_adapters if names is None else names
        terms = [ops.householder_orthogonality_loss(self.hra_u[n]) for n in names if n in self.hra_u]
        return torch.stack(terms).sum() if terms else self.get_base_layer().weight.new_zeros(())


def create_hra_layer(target: nn.Module, adapter_name: str, config: HRAConfig, module_name: str = "",
                     loading: bool = False) -> Optional[HRALayer]:
    base = innermost_base(target)
    if not isinstance(base, (nn.Linear, nn.Conv2d)):
        return None
    layer = HRALayer(target)
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


def orthogonality_loss(model: nn.Module, weight: float = 1.0,
                       adapter_names: Optional[Union[str, Sequence[str]]] = None) -> torch.Tensor:
    """HRA's regulariser ``weight * sum_layers ||U^T U - I||_F^2`` (U: unit reflection planes) over the active
    (or the named) adapters of ``model``; add it to the task loss. A scalar tensor with gradients."""
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    terms = [layer.orthogonality_loss(adapter_names) for layer in model.modules() if isinstance(layer, HRALayer)]
    if not terms:
        raise ValueError("orthogonality_loss() found no HRA layer in the model; is it an HRA model?")
    return weight * torch.stack(terms).sum()


class HRAModel(AdapterModel):
    """The engine plus HRA's orthogonality regulariser."""

    def orthogonality_loss(self, weight: float = 1.0,
                           adapter_names: Optional[Union[str, Sequence[str]]] = None) -> torch.Tensor:
        """``weight * sum ||U^T U - I||_F^2`` over the reflection planes of the active adapters; add to the loss."""
        return orthogonality_loss(self.model, weight, adapter_names)


HRA = register_method(
    MethodSpec(
        peft_type=PeftType.HRA.value,
        config_cls=HRAConfig,
        create_layer=create_hra_layer,
        prefix="hra_",
        model_cls=HRAModel,
        default_target_modules=DEFAULT_TARGETS,
    )
)
