"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form whose rank budget is moved to the matrices that matter.

A frozen weight W (out x in) gets ``delta W = B @ (A * E) * scaling / (ranknum + 1e-5)`` with A: r x in (right
singular vectors), E: r x 1 (singular values, zero at init so the adapter starts as the identity), B: out x r (left
singular vectors), ``scaling = lora_alpha`` and ``ranknum = init_r``. During training, ``update_and_allocate(step)``
scores every triplet (A[i], E[i], B[:, i]) and zeroes the E entries of the least important ones following a cubic
budget schedule (:mod:`.adalora_budget`); the final keep-masks are stored in ``config.rank_pattern``, checkpoints
hold only the kept triplets and reload at those ranks. An orthogonality penalty on A and B is added to the loss.

Budgeting needs no extra argument: after every ``step()`` of the optimiser that holds the adapter's parameters
(``transformers.Trainer`` or a plain PyTorch loop), ``update_and_allocate`` runs for that step. For explicit control
use :class:`AdaLoraCallback` (``transformers.Trainer``), :func:`attach_to_optimizer` (any torch optimiser, chosen
step numbering) or call ``update_and_allocate(step)`` yourself; any of them switches the automatic hook off for
that model (``model.base_model.budget_mode = "off"`` disables budgeting).
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.validation import SCALE_LIMIT, Rule
from peftkit.engine.layer import AdapterLayer, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.engine.tuner import AdapterModel
from peftkit.methods.lora import lora_ops
from peftkit.methods.lora.adalora_budget import RankAllocator, Triplet, apply_rank_pattern, budget_schedule
from peftkit.methods.common import adapter_dtype, conv1d_cls
from peftkit.integrations import quantization as _quant
from peftkit.methods.lora.lora import LoraConfig

logger = logging.getLogger(__name__)

_BIAS_CHOICES = ("none", "all", "lora_only")
_EPS = 1e-5  # added to ranknum in the scaling, as Hugging Face PEFT does


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of AdaLoRA adapters; field names and meanings follow Hugging Face PEFT.

    As in PEFT it is a subclass of :class:`LoraConfig` (``isinstance(AdaLoraConfig(...), LoraConfig)``; it has
    every LoRA field), but it keeps its own defaults and checks: LoRA's validation does not run on it.

    Training has three phases: ``tinit`` warm-up steps at the full rank ``init_r``; a budgeting phase until
    ``total_step - tfinal`` in which the total rank shrinks cubically to ``target_r`` per matrix on average
    (re-allocated every ``deltaT`` steps); ``tfinal`` final steps at the fixed rank pattern.
    """

    target_r: int = field(default=8, metadata={"help": "Target average rank per adapted matrix."})
    init_r: int = field(default=12, metadata={"help": "Initial rank of every adapted matrix."})
    tinit: int = field(default=0, metadata={"help": "Warm-up steps before the budget starts to shrink."})
    tfinal: int = field(default=0, metadata={"help": "Final steps trained at the fixed rank pattern."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the sensitivity |w * grad|."})
    beta2: float = field(default=0.85, metadata={"help": "EMA coefficient of the uncertainty of the sensitivity."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonality penalty on A and B."})
    total_step: Optional[int] = field(default=None, metadata={"help": "Total training steps (required)."})
    rank_pattern: Optional[dict] = field(
        default=None,
        metadata={"help": "Set by training: '<module>.lora_E' -> keep-mask (list of bools) of its triplets. "
                  "Checkpoints hold only the kept triplets and reload at these ranks."},
    )
    # LoRA fields that PEFT's AdaLoraConfig inherits and writes to adapter_config.json.
    r: int = field(default=8, metadata={"help": "Unused by AdaLoRA (set init_r); kept for file compatibility."})
    lora_alpha: int = field(default=8, metadata={"help": "Scaling numerator: delta W is scaled by lora_alpha / init_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True if the layer stores weight as (in, out), like GPT-2's Conv1D."})
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'lora_only'."})
    use_rslora: bool = field(default=False, metadata={"help": "Ignored by AdaLoRA (as in PEFT)."})
    init_lora_weights: bool = field(
        default=True, metadata={"help": "True: E zeros, A and B normal(0, 0.02) (identity at start); False: all random."}
    )
    use_dora: bool = field(default=False, metadata={"help": "Not supported by AdaLoRA; must stay False."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Ignored by AdaLoRA (as in PEFT)."})

    # Checked by peftkit.engine.validation before the model is touched (types come from the annotations).
    field_rules: ClassVar[dict[str, Rule]] = {
        # (ranges of the schedule fields are checked in __post_init__, with messages about the schedule)
        "total_step": Rule(type=Any), "init_lora_weights": Rule(type=Any),
        "lora_alpha": Rule(type=float, min=-SCALE_LIMIT, max=SCALE_LIMIT), "r": Rule(min=1),
        "rank_pattern": Rule(type=Any),  # keep-masks (lists of booleans), not LoRA's per-module ranks
    }
    rank_fields: ClassVar[tuple[str, ...]] = ("init_r",)

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADALORA
        TargetedConfig.__post_init__(self)  # AdaLoRA's own checks below replace LoraConfig's
        if self.total_step is None or not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ValueError(
                "AdaLoraConfig needs total_step, the number of optimiser steps of the training run (e.g. "
                "total_step=len(train_dataloader) * num_epochs); the rank budget schedule is laid out over it."
            )
        for name in ("init_r", "tinit", "tfinal", "deltaT", "target_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AdaLoraConfig.{name} must be a non-negative integer, got {value!r}.")
        if self.init_r < 1:
            raise ValueError(f"AdaLoraConfig.init_r must be at least 1, got {self.init_r}.")
        if self.deltaT < 1:
            raise ValueError(f"AdaLoraConfig.deltaT must be at least 1 (steps between allocations), got {self.deltaT}.")
        if self.target_r > self.init_r:
            raise ValueError(
                f"AdaLoraConfig.target_r ({self.target_r}) is larger than init_r ({self.init_r}); AdaLoRA only prunes "
                "ranks. Set init_r >= target_r."
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit ({self.tinit}) + tfinal ({self.tfinal}) must be smaller than total_step ({self.total_step}), "
                "otherwise no step is left to shrink the rank budget. Decrease tinit/tfinal or increase total_step."
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"AdaLoraConfig.{name} must be in (0, 1), got {value!r}.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}.")
        if self.use_dora:
            raise ValueError("AdaLoRA does not support DoRA; set use_dora=False (or use LoraConfig(use_dora=True)).")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"AdaLoraConfig.init_lora_weights must be True or False, got {self.init_lora_weights!r}.")
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"AdaLoraConfig.bias must be one of {_BIAS_CHOICES}, got {self.bias!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, (list, tuple)) or not all(v in (0, 1) for v in mask):
                raise ValueError(
                    f"AdaLoraConfig.rank_pattern[{key!r}] must be a keep-mask (list of booleans) written by AdaLoRA's "
                    f"budget allocator, got {mask!r}. To choose the starting rank, set init_r."
                )
        if self.rank_pattern is not None:
            self.rank_pattern = {k: [bool(v) for v in m] for k, m in self.rank_pattern.items()}
        if self.r != 8:
            logger.warning("AdaLoraConfig.r is not used by AdaLoRA; set init_r (start) and target_r (average end rank).")
        if self.use_rslora or self.alpha_pattern:
            logger.warning("AdaLoRA ignores use_rslora and alpha_pattern (as Hugging Face PEFT does).")


def _pattern_mask(config: AdaLoraConfig, module_name: str, adapter_name: str) -> Optional[list[bool]]:
    """The keep-mask of one module in ``rank_pattern`` (keys with or without the adapter name, as PEFT writes)."""
    pattern = config.rank_pattern or {}
    return pattern.get(f"{module_name}.lora_E", pattern.get(f"{module_name}.lora_E.{adapter_name}"))


# ------------------------------------------------------------------------------------------------- layers
class SVDLayer(AdapterLayer):
    """Shared state of the AdaLoRA layers. Per adapter: lora_A (r, in * k), lora_E (r, 1), lora_B (out, r) and
    the frozen, unsaved ``ranknum`` (the initial rank, the denominator of the scaling)."""

    adapter_slots = ("lora_A", "lora_B", "lora_E")
    aux_slots = ("lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def _fan_in(self) -> int:
        """Columns of A: the input features (times the kernel size for convolutions)."""
        return self.in_features

    def update_layer(
        self, adapter_name: str, config: AdaLoraConfig, module_name: str = "", loading: bool = False
    ) -> None:
        r = config.init_r
        if loading:  # a checkpoint holds only the triplets its rank pattern kept
            mask = _pattern_mask(config, module_name, adapter_name)
            if mask is not None:
                r = sum(mask)
        base_w = self.get_base_layer().weight
        dtype, device = adapter_dtype(base_w), base_w.device
        a = torch.empty(r, self._fan_in(), dtype=dtype, device=device)
        e = torch.empty(r, 1, dtype=dtype, device=device)
        b = torch.empty(self.out_features, r, dtype=dtype, device=device)
        with torch.no_grad():
            if loading:
                for t in (a, e, b):
                    t.zero_()
            elif config.init_lora_weights:
                e.zero_()
                nn.init.normal_(a, mean=0.0, std=0.02)
                nn.init.normal_(b, mean=0.0, std=0.02)
            else:
                for t in (a, e, b):
                    nn.init.normal_(t)
        self.lora_A[adapter_name] = nn.Parameter(a)
        self.lora_B[adapter_name] = nn.Parameter(b)
        self.lora_E[adapter_name] = nn.Parameter(e)
        # The scaling keeps dividing by the initial rank after pruning, as in PEFT.
        ranknum = torch.full((1,), float(config.init_r), dtype=dtype, device=device)
        self.ranknum[adapter_name] = nn.Parameter(ranknum, requires_grad=False)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)
        p = float(config.lora_dropout)
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(adapter_name, None)

    def triplet(self, adapter_name: str) -> Triplet:
        """(A, E, B) of one adapter."""
        return self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]

    def _product(self, adapter_name: str) -> torch.Tensor:
        """``B @ (A * E) * scaling / (ranknum + eps)``: (out, in * k)."""
        a, e, b = self.triplet(adapter_name)
        return b @ (a * e) * self.scaling[adapter_name] / (self.ranknum[adapter_name] + _EPS)


class SVDLinear(SVDLayer):
    """AdaLoRA on ``nn.Linear`` or transformers' ``Conv1D`` (weight stored as in x out)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        w = base_layer.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        in_f, out_f = _quant.linear_features(innermost_base(base_layer)) or (in_f, out_f)  # bnb 4-bit packs W
        super().__init__(base_layer, in_f, out_f)
        self.fan_in_fan_out = fan_in_fan_out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self._product(adapter_name)
        return delta.t() if self.fan_in_fan_out else delta

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """AdaLoRA's update is LoRA's with A' = A * E * scaling / ranknum, so the fused LoRA node serves it: one
        autograd node, computed in the input's dtype, the product added into the base output in place. A' is
        built by autograd from the small (r, in) factors, so gradients reach A and E unchanged."""
        base = self._modules["base_layer"]
        reason = lora_ops.fused_linear_decline(base, x)
        if reason is not None or args or kwargs:
            return super().forward_adapters(x, names, *args, **kwargs)
        factors, drop = [], []
        for n in names:
            a, e, b = self.triplet(n)
            factors.append((a * e * (self.scaling[n] / (self.ranknum[n] + _EPS)), b, 1.0))
            d = self.lora_dropout[n]
            drop.append(d.p if self.training and isinstance(d, nn.Dropout) else 0.0)
        return lora_ops.lora_linear(x, base.weight, base.bias, factors, self.fan_in_fan_out, drop)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a, e, b = self.triplet(adapter_name)
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        ranknum = self.ranknum[adapter_name] + _EPS
        # x (..., in) @ (A*E)^T (in, r) @ B^T (r, out): never forms the (out, in) delta.
        update = (x @ (a * e).T @ b.T) * self.scaling[adapter_name] / ranknum
        return result + update.to(result.dtype)


class SVDConv2d(SVDLayer):
    """AdaLoRA on ``nn.Conv2d``: A is (r, in_channels * kh * kw); the delta kernel is reshaped from B @ (A * E)."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels)

    def _fan_in(self) -> int:
        kh, kw = self.get_base_layer().kernel_size
        return self.in_features * kh * kw

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._product(adapter_name).reshape(self.get_base_layer().weight.shape)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        weight = self.delta_weight(adapter_name)
        x = self.lora_dropout[adapter_name](x.to(weight.dtype))
        update = F.conv2d(x, weight, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        return result + update.to(result.dtype)


def create_adalora_layer(
    target: nn.Module, adapter_name: str, config: AdaLoraConfig, module_name: str = "", loading: bool = False
) -> Optional[SVDLayer]:
    base = innermost_base(target)
    if isinstance(base, nn.Linear):
        if config.fan_in_fan_out:
            raise ValueError(f"fan_in_fan_out=True but {module_name} is an nn.Linear (stored as out x in); set it to False.")
        layer: SVDLayer = SVDLinear(target, fan_in_fan_out=False)
    elif conv1d_cls() and isinstance(base, conv1d_cls()):
        layer = SVDLinear(target, fan_in_fan_out=True)
    elif isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError(f"AdaLoRA does not support grouped convolutions ({module_name} has groups={base.groups}).")
        layer = SVDConv2d(target)
    else:
        return None  # the engine reports modules of types AdaLoRA cannot adapt
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


# -------------------------------------------------------------------------------------------------- model
class AdaLoraModel(AdapterModel):
    """The engine plus AdaLoRA's model-level logic: the rank allocator, the orthogonality penalty, pruned saving.

    At most one adapter is trainable (``inference_mode=False``); the budget is allocated for it.
    """

    trainable_adapter_name: Optional[str] = None
    rankallocator: Optional[RankAllocator] = None
    # "auto": update_and_allocate runs after every step of the optimiser that holds the adapter's parameters
    # (_automatic_budget); "explicit" once AdaLoraCallback, attach_to_optimizer or a direct update_and_allocate call
    # takes over; "off": no budgeting unless called (set it to train at the initial ranks).
    budget_mode: str = "auto"

    def inject_adapter(self, adapter_name: str, config: AdaLoraConfig, loading: bool = False) -> None:
        if not config.inference_mode and self.trainable_adapter_name is not None:
            raise ValueError(
                f"AdaLoRA trains one adapter at a time and {self.trainable_adapter_name!r} is trainable; add "
                f"{adapter_name!r} with inference_mode=True (or delete the other one first)."
            )
        super().inject_adapter(adapter_name, config, loading=loading)
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = self._new_allocator(adapter_name)
            _watch_for_automatic_budgeting(self)

    def _new_allocator(self, adapter_name: str) -> RankAllocator:
        """Budget from the adapter's current ranks down to ``target_r`` per matrix."""
        config = self.peft_config[adapter_name]
        triplets = self.triplets(adapter_name)
        init_budget = sum(t[1].shape[0] for t in triplets.values())
        return RankAllocator(config.beta1, config.beta2, init_budget, config.target_r * len(triplets))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name, self.rankallocator = None, None

    def triplets(self, adapter_name: str) -> dict[str, Triplet]:
        """``'<module>.lora_E'`` (the ``rank_pattern`` key) -> (A, E, B) of every layer holding the adapter."""
        return {
            f"{name}.lora_E": layer.triplet(adapter_name)
            for name, layer in self.adapter_layers()
            if isinstance(layer, SVDLayer) and adapter_name in layer.lora_E
        }

    # ------------------------------------------------------------------------------------------- training
    def orthogonal_regularization(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Mean over A and B of all layers of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (PEFT's penalty,
        unsquared Frobenius norms). ``orth_reg_weight`` times this is added to the loss in ``forward``."""
        name = adapter_name or self._require_trainable()
        terms = []
        for a, _, b in self.triplets(name).values():
            a, b = _unsharded(a), _unsharded(b)  # FSDP2: outside the layers' forward A and B are sharded
            for cov in (a @ a.T, b.T @ b):
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                terms.append(torch.norm(cov - eye, p="fro"))
        if not terms:
            return torch.zeros(())
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total / len(terms)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.rankallocator is not None and self.budget_mode == "auto" and not lora_ops.compiling():
            _watch_for_automatic_budgeting(self)  # copies (deepcopy, pickle) are watched from their first forward
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self.trainable_adapter_name
        # The penalty joins any loss the model returns while an adapter is trainable (also in eval mode), as in
        # PEFT's task models (PeftModelForCausalLM, ...); PEFT's plain PeftModel skips it, ours never does.
        if isinstance(loss, torch.Tensor) and name is not None and name in self.active_adapters and self._enabled():
            weight = self.peft_config[name].orth_reg_weight
            outputs.loss = loss + weight * self.orthogonal_regularization(name).to(loss.dtype)
        return outputs

    def _enabled(self) -> bool:
        return not any(layer.adapters_disabled for _, layer in self.adapter_layers())

    def _require_trainable(self) -> str:
        if self.trainable_adapter_name is None or self.rankallocator is None:
            raise ValueError(
                "This AdaLoRA model has no trainable adapter (it was loaded with is_trainable=False or created with "
                "inference_mode=True); there is no rank budget to allocate."
            )
        return self.trainable_adapter_name

    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and the rank masks for optimiser step ``global_step`` (0-based).

        Call it at every step after ``loss.backward()`` and before ``optimizer.zero_grad()`` (after
        ``optimizer.step()`` so masked triplets stay zero for the next forward), or let :class:`AdaLoraCallback` /
        :func:`attach_to_optimizer` do it. Budgeting phase: scores are updated and the masks re-allocated every
        ``deltaT`` steps; at ``total_step - tfinal`` the final ``config.rank_pattern`` is fixed; later steps re-apply it.
        """
        name = self._require_trainable()
        if not _AUTO_CALL.active:
            already = self.__dict__.get("_auto_done_step") == global_step and self.budget_mode == "auto"
            self.budget_mode = "explicit"  # the caller drives the budget from now on
            if already:
                return  # the optimiser hook allocated for this very step already (see _automatic_budget)
        self.__dict__["_auto_done_step"] = global_step
        config = self.peft_config[name]
        allocator = self.rankallocator
        triplets = self.triplets(name)
        live = _gather_for_budget(triplets)  # FSDP2: the budget works on full copies, written back below
        if live is not None:
            triplets, live = live, triplets
        final_start = config.total_step - config.tfinal
        schedule = dict(init_budget=allocator.init_budget, target_budget=allocator.target_budget, tinit=config.tinit,
                        tfinal=config.tfinal, total_step=config.total_step, deltaT=config.deltaT)
        if global_step < final_start:
            allocator.update_importance(triplets)
            budget, mask_now = budget_schedule(global_step, **schedule)
            if mask_now:
                config.rank_pattern = allocator.mask_to_budget(triplets, budget)
        elif global_step == final_start:
            budget, _ = budget_schedule(global_step, **schedule)
            config.rank_pattern = allocator.mask_to_budget(triplets, budget)
            allocator.reset()
        elif config.rank_pattern:
            apply_rank_pattern(triplets, config.rank_pattern)
        if live is not None:
            from peftkit.integrations.distributed import copy_into

            with torch.no_grad():
                for key, (_, e, _) in triplets.items():
                    copy_into(live[key][1], e)  # each rank keeps its slice of the masked E

    @torch.no_grad()
    def resize_modules_by_rank_pattern(self, rank_pattern: dict[str, list[bool]], adapter_name: str) -> None:
        """Drop the pruned triplets from the live layers (after training, for a smaller model in memory).

        The parameters are replaced by new, smaller ones: an optimiser built before this call no longer holds them.
        The scaling keeps dividing by the initial rank, so the outputs do not change.
        """
        for name, layer in self.adapter_layers():
            if not isinstance(layer, SVDLayer) or adapter_name not in layer.lora_E:
                continue
            mask = rank_pattern.get(f"{name}.lora_E", rank_pattern.get(f"{name}.lora_E.{adapter_name}"))
            a, e, b = layer.triplet(adapter_name)
            if mask is None or len(mask) != e.shape[0] or all(mask):
                continue
            keep = torch.tensor(mask, dtype=torch.bool, device=e.device)
            trainable = e.requires_grad
            for slot, value in (("lora_A", a[keep]), ("lora_E", e[keep]), ("lora_B", b[:, keep])):
                getattr(layer, slot)[adapter_name] = nn.Parameter(value.clone(), requires_grad=trainable)
            layer.r[adapter_name] = int(keep.sum())
        if self.rankallocator is not None and adapter_name == self.trainable_adapter_name:
            # the importance averages have the old shapes: start a new budget from the kept ranks
            self.rankallocator = self._new_allocator(adapter_name)

    # ------------------------------------------------------------------------------------------ save / load
    def checkpoint_tensors_to_load(self, adapter_name: str, tensors: dict[str, torch.Tensor],
                                   saved_config: Any = None) -> dict[str, torch.Tensor]:
        """A checkpoint loaded into an existing adapter (``load_adapter`` on its name: Trainer's resume and best-model
        reload) holds only the triplets its ``rank_pattern`` kept; put them back at their places in the live ranks
        (the pruned ones zero, as the mask made them) and adopt that rank pattern once loaded."""
        pattern = getattr(saved_config, "rank_pattern", None)
        if not pattern:
            return tensors
        out = dict(tensors)
        prefix = "base_model.model."
        for key, (a, e, b) in self.triplets(adapter_name).items():
            module = key[: -len(".lora_E")]
            mask = pattern.get(key, pattern.get(f"{key}.{adapter_name}"))
            stored = out.get(f"{prefix}{module}.lora_E")
            if mask is None or stored is None or len(mask) != e.shape[0] or stored.shape[0] != sum(mask) or all(mask):
                continue
            keep = torch.tensor(mask, dtype=torch.bool)
            # plain tensors of the full shapes (an FSDP2 DTensor's shape is the full one; its slice is taken on copy)
            full_a, full_e, full_b = (torch.zeros(tuple(t.shape), dtype=t.dtype) for t in (a, e, b))
            full_a[keep] = out[f"{prefix}{module}.lora_A"].to(a.dtype)
            full_e[keep] = stored.to(e.dtype)
            full_b[:, keep] = out[f"{prefix}{module}.lora_B"].to(b.dtype)
            out[f"{prefix}{module}.lora_A"], out[f"{prefix}{module}.lora_E"], out[f"{prefix}{module}.lora_B"] = (
                full_a, full_e, full_b)
        self.__dict__["_pending_rank_pattern"] = (adapter_name, {k: list(v) for k, v in pattern.items()})
        return out

    def after_adapter_loaded(self, adapter_name: str) -> None:
        pending = self.__dict__.pop("_pending_rank_pattern", None)
        if pending is not None and pending[0] == adapter_name:
            self.peft_config[adapter_name].rank_pattern = pending[1]
        super().after_adapter_loaded(adapter_name)

    def adapter_tensors_to_save(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep only the triplets ``rank_pattern`` keeps: A and E rows, B columns (PEFT's checkpoint layout)."""
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            return tensors
        out = dict(tensors)
        for key in self.triplets(adapter_name):
            module = key[: -len(".lora_E")]
            mask = _pattern_mask(self.peft_config[adapter_name], module, adapter_name)
            e = out.get(f"{module}.lora_E")
            if mask is None or e is None or len(mask) != e.shape[0] or all(mask):
                continue  # nothing pruned, or already stored at the kept rank
            keep = torch.tensor(mask, dtype=torch.bool, device=e.device)
            out[f"{module}.lora_E"] = e[keep]
            out[f"{module}.lora_A"] = out[f"{module}.lora_A"][keep]
            out[f"{module}.lora_B"] = out[f"{module}.lora_B"][:, keep]
        return out


# ------------------------------------------------------------------------------------ automatic budgeting
def find_adalora_model(model: nn.Module) -> AdaLoraModel:
    """The :class:`AdaLoraModel` inside ``model`` (a PeftModel, a DDP/accelerate wrapper, or itself)."""
    if isinstance(model, AdaLoraModel):
        return model
    for module in model.modules():
        if isinstance(module, AdaLoraModel):
            return module
    raise ValueError(
        f"{type(model).__name__} holds no AdaLoRA adapter; create it with get_peft_model(model, AdaLoraConfig(...))."
    )


class _AutoCall(threading.local):
    active = False


_AUTO_CALL = _AutoCall()
_WATCHED: "weakref.WeakSet[AdaLoraModel]" = weakref.WeakSet()
_GLOBAL_HOOK: Any = None


def _watch_for_automatic_budgeting(model: AdaLoraModel) -> None:
    """Budget with no extra argument: one global optimiser post-step hook (torch's
    ``register_optimizer_step_post_hook``) serves every trainable AdaLoRA model still in ``budget_mode == "auto"``."""
    global _GLOBAL_HOOK
    _WATCHED.add(model)
    if _GLOBAL_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _GLOBAL_HOOK = register_optimizer_step_post_hook(_automatic_budget)


def _optimizer_holds(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def _automatic_budget(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After ``optimizer.step()`` (gradients still there, the new masks hold for the next forward): run
    ``update_and_allocate`` for each auto-budgeted AdaLoRA model whose parameters this optimiser updates. The step
    index is the optimiser's own count for the first E vector (Adam-style ``state['step']``, restored on resume),
    else a per-model counter from 0."""
    if not _WATCHED:
        return
    for model in list(_WATCHED):
        if model.budget_mode != "auto" or model.rankallocator is None or model.trainable_adapter_name is None:
            continue
        triplets = model.triplets(model.trainable_adapter_name)
        if not triplets:
            continue
        e = next(iter(triplets.values()))[1]
        if e.grad is None or not _optimizer_holds(optimizer, e):
            continue
        count = optimizer.state.get(e, {}).get("step") if hasattr(optimizer, "state") else None
        if count is not None:
            step = int(count.item() if isinstance(count, torch.Tensor) else count) - 1
        else:
            step = model.__dict__.get("_auto_counter", 0)
        model.__dict__["_auto_counter"] = step + 1
        _AUTO_CALL.active = True
        try:
            model.update_and_allocate(step)
        finally:
            _AUTO_CALL.active = False


class AdaLoraStepHook:
    """Handle returned by :func:`attach_to_optimizer`: ``global_step`` is the next step index; ``remove()``
    detaches the hook."""

    def __init__(self, model: AdaLoraModel, optimizer: torch.optim.Optimizer, start_step: int) -> None:
        self.model = model
        self.global_step = start_step
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # After the update, before zero_grad: gradients are still there and the new masks hold for the next forward.
        self.model.update_and_allocate(self.global_step)
        self.global_step += 1

    def remove(self) -> None:
        self._handle.remove()


def _unsharded(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a whole tensor: an FSDP2 ``DTensor`` is gathered (differentiably, a collective on every rank)."""
    from peftkit.integrations.distributed import is_dtensor

    return t.full_tensor() if is_dtensor(t) else t


def _gather_for_budget(triplets: dict[str, Triplet]) -> Optional[dict[str, Triplet]]:
    """Full copies (with full gradients) of FSDP2-sharded triplets for the budget step, or None if none is sharded.
    Every rank gathers the same tensors in the same order and computes the same masks."""
    from peftkit.integrations.distributed import full_tensor, is_deepspeed_partitioned, is_dtensor

    params = [p for t in triplets.values() for p in t]
    if any(is_deepspeed_partitioned(p) for p in params):
        raise ValueError(
            "AdaLoRA's update_and_allocate cannot run on DeepSpeed ZeRO-3 partitioned parameters (their gradients "
            "live in DeepSpeed's optimizer partitions, not in .grad); use ZeRO-2, DDP or FSDP2 for AdaLoRA training.")
    if not any(is_dtensor(p) for p in params):
        return None
    out = {}
    for key, t in triplets.items():
        copies = []
        for p in t:
            q = full_tensor(p).clone()
            q.grad = full_tensor(p.grad) if p.grad is not None else None
            copies.append(q)
        out[key] = tuple(copies)
    return out


def attach_to_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, start_step: int = 0) -> AdaLoraStepHook:
    """Run ``update_and_allocate`` after every ``optimizer.step()``, counting steps from ``start_step``.

    Works with any ``torch.optim.Optimizer`` and any loop that zeroes gradients before backward or after the step.
    """
    adalora = find_adalora_model(model)
    name = adalora._require_trainable()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in in_optimizer for t in adalora.triplets(name).values() for p in t):
        raise ValueError(
            "The optimiser does not hold the AdaLoRA adapter's parameters; build it from the PeftModel's trainable "
            "parameters (e.g. torch.optim.AdamW(p for p in model.parameters() if p.requires_grad))."
        )
    adalora.budget_mode = "explicit"  # this hook drives the budget, not the automatic one
    return AdaLoraStepHook(adalora, optimizer, start_step)


def _no_event(*args: Any, **kwargs: Any) -> None:
    return None


class AdaLoraCallback:
    """A ``transformers.TrainerCallback`` that runs ``update_and_allocate(state.global_step)`` after every optimiser
    step (``on_optimizer_step``: gradients present, before ``zero_grad``), so ``Trainer.train()`` does the budgeting:

        trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[AdaLoraCallback()])

    It implements the callback protocol without subclassing, so importing peftkit does not import transformers'
    trainer module (seconds); unknown ``on_*`` events are no-ops.
    """

    def __init__(self, model: Optional[nn.Module] = None) -> None:
        self._model = model

    def _resolve(self, model: Optional[nn.Module]) -> AdaLoraModel:
        source = self._model if self._model is not None else model
        if source is None:
            raise ValueError("AdaLoraCallback got no model; pass AdaLoraCallback(model) or use it with a Trainer.")
        return find_adalora_model(source)  # the AdaLoraModel is the second module of a PeftModel: cheap

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        import transformers.trainer_callback as trainer_callback  # already imported by a running Trainer

        if not hasattr(trainer_callback.TrainerCallback, "on_optimizer_step"):
            raise RuntimeError(
                "This transformers version has no on_optimizer_step event, so AdaLoraCallback would never run. "
                "Upgrade transformers, or call attach_to_optimizer(model, trainer.optimizer) after create_optimizer()."
            )
        adalora = self._resolve(model)
        config = adalora.peft_config[adalora._require_trainable()]
        adalora.budget_mode = "explicit"  # this callback drives the budget, not the automatic hook
        max_steps = getattr(state, "max_steps", 0) or 0
        if 0 < max_steps < config.total_step - config.tfinal:
            logger.warning(
                "The Trainer runs %d optimiser steps but AdaLoraConfig's budgeting phase lasts until step "
                "total_step - tfinal = %d: the rank budget will not reach target_r. Set total_step to the run's "
                "optimiser steps (%d).",
                max_steps, config.total_step - config.tfinal, max_steps,
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        # state.global_step is the index of the step just taken: the Trainer increments it after this event.
        self._resolve(model).update_and_allocate(state.global_step)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _no_event
        raise AttributeError(name)


ADALORA = register_method(
    MethodSpec(
        peft_type=PeftType.ADALORA.value,
        config_cls=AdaLoraConfig,
        create_layer=create_adalora_layer,
        prefix="lora_",
        model_cls=AdaLoraModel,
        supports_quantized_base=True,
        # PEFT's AdaLoRA defaults for these model types.
        default_target_modules={
            "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
            "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"],
            "t5": ["q", "k", "v", "o", "wi", "wo"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            "gpt_neox": ["query_key_value"],
        },
    )
)
