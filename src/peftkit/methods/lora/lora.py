"""LoRA (Hu et al., 2021) with rsLoRA scaling, DoRA (weight-decomposed LoRA) and PiSSA initialisation.

For a frozen weight W (out x in), adapter ``a`` adds ``scaling * B @ A`` with A: r x in, B: out x r and
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). DoRA rescales each output row of the
adapted weight to a learned magnitude: ``W' = m * (W + sBA) / ||W + sBA||_row``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.config import PeftType, TargetedConfig
from peftkit.engine.layer import BASE_ADAPTER, AdapterLayer, MixedBatch, innermost_base
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.engine.tuner import AdapterModel
from peftkit.engine.validation import SCALE_LIMIT, Rule
from peftkit.kernels import kernels_enabled
from peftkit.methods.lora import input_recompute, lora_ops
from peftkit.methods.common import adapter_dtype, conv1d_cls, pattern_value
from peftkit.integrations import quantization as _quant

logger = logging.getLogger(__name__)

_BIAS_CHOICES = ("none", "all", "lora_only")
PISSA_MAX_NITER = 1000  # init_lora_weights="pissa_niter_<n>": more iterations are refused (see LoraConfig)


@dataclass
class LoraConfig(TargetedConfig):
    """Configuration of LoRA adapters; field names and meanings follow Hugging Face PEFT."""

    r: int = field(default=8, metadata={"help": "Rank of the update."})
    lora_alpha: int = field(default=8, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True if the layer stores weight as (in, out), like GPT-2's Conv1D."})
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'lora_only'."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling lora_alpha / sqrt(r)."})
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: A Kaiming-uniform, B zeros (identity at start); 'gaussian': A normal(0, 1/r); "
                  "False: random A and B (not identity); 'pissa' / 'pissa_niter_<n>': principal singular vectors, "
                  "residual kept in the base weight."},
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA: learn a magnitude per output."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module rank, keys are regexes."})
    alpha_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module alpha, keys are regexes."})

    # Checked by peftkit.engine.validation before the model is touched (types come from the annotations).
    field_rules: ClassVar[dict[str, Rule]] = {
        "r": Rule(min=1),
        "lora_alpha": Rule(type=float, min=-SCALE_LIMIT, max=SCALE_LIMIT),
        "lora_dropout": Rule(min=0.0, max=1.0, max_open=True),
        "rank_pattern": Rule(regex_keys=True, each=Rule(min=1)),
        "alpha_pattern": Rule(type=dict[str, float], regex_keys=True, each=Rule(min=-SCALE_LIMIT, max=SCALE_LIMIT)),
    }
    rank_fields: ClassVar[tuple[str, ...]] = ("r",)

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LORA
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
        for key, value in (self.rank_pattern or {}).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}.")
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"LoraConfig.bias must be one of {_BIAS_CHOICES}, got {self.bias!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "olora", "orthogonal") or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
                "'pissa_niter_<n>', 'olora' or 'orthogonal'."
            )
        if isinstance(init, str) and init.startswith("pissa_niter_") and int(init.rsplit("_", 1)[1]) > PISSA_MAX_NITER:
            raise ValueError(
                f"LoraConfig.init_lora_weights={init!r} asks for {int(init.rsplit('_', 1)[1])} subspace iterations; "
                f"more than {PISSA_MAX_NITER} gain no accuracy and can run for days. Use 'pissa_niter_4' to "
                "'pissa_niter_16' (fast SVD), or 'pissa' (exact SVD)."
            )
        if init == "orthogonal" and (self.r % 2 or any(v % 2 for v in (self.rank_pattern or {}).values())):
            raise ValueError(f"init_lora_weights='orthogonal' needs even ranks, got r={self.r}"
                             f"{' and rank_pattern=' + str(self.rank_pattern) if self.rank_pattern else ''}.")
        if self.use_dora and (str(init).startswith("pissa") or init == "olora"):
            raise ValueError(f"init_lora_weights={init!r} cannot be combined with use_dora.")


# ------------------------------------------------------------------------------------------------ math
def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _norm_dims(weight: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, weight.dim()))


class LoraLayer(AdapterLayer):
    """Shared state of every LoRA layer type."""

    adapter_slots = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_gate")
    aux_slots = ("lora_dropout",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_gate = nn.ModuleDict()  # AdapterHub's use_gating (UniPELT): only adapters whose config asks for it
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self._dora_merge_norm: dict[str, torch.Tensor] = {}

    def _set_hyper(self, adapter_name: str, config: LoraConfig, module_name: str) -> int:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.use_dora[adapter_name] = bool(config.use_dora)
        p = float(config.lora_dropout)
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        return r

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora, self._dora_merge_norm):
            d.pop(adapter_name, None)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Multiply the adapter's effect by ``scale`` relative to lora_alpha / r."""
        if adapter_name in self.scaling:
            base = lora_scaling(self.lora_alpha[adapter_name], self.r[adapter_name], False)
            self.scaling[adapter_name] = base * scale

    # ---- merge: DoRA is not additive
    def _base_weight_matrix(self) -> torch.Tensor:
        """The base weight in the (out, in, ...) orientation the adapter's delta uses."""
        return self.get_base_layer().weight

    def _dora_norm(self, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora.get(adapter_name):
            return weight + delta
        factor = self._dora_factor(adapter_name, weight, delta)
        self._dora_merge_norm[adapter_name] = factor
        return factor * (weight + delta)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora.get(adapter_name):
            return weight - delta
        factor = self._dora_merge_norm.pop(adapter_name)
        return weight / factor - delta


class Linear(LoraLayer):
    """LoRA on ``nn.Linear`` or transformers' ``Conv1D`` (weight stored as in x out, ``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        w = base_layer.weight
        shape = tuple(getattr(w, "ds_shape", w.shape))  # DeepSpeed ZeRO-3 leaves an empty local tensor
        self.in_features, self.out_features = (shape[0], shape[1]) if fan_in_fan_out else (shape[1], shape[0])
        quantized = _quant.linear_features(innermost_base(base_layer))  # bitsandbytes 4-bit packs its weight
        if quantized is not None:
            self.in_features, self.out_features = quantized

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str = "", loading: bool = False) -> None:
        r = self._set_hyper(adapter_name, config, module_name)
        base_w = self.get_base_layer().weight
        dtype = adapter_dtype(base_w)
        a = nn.Linear(self.in_features, r, bias=False, device=base_w.device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=base_w.device, dtype=dtype)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        init = config.init_lora_weights
        if loading:
            nn.init.zeros_(b.weight)  # overwritten by the checkpoint; keep creation cheap and data-independent
        elif isinstance(init, str) and init.startswith("pissa"):
            if _quant.is_quantized(self.get_base_layer()):
                raise ValueError(f"PiSSA initialisation rewrites the base weight of {module_name or 'the layer'}, "
                                 "which is quantised here; initialise PiSSA on the unquantised model instead.")
            self._pissa_init(adapter_name, init)
        elif init == "olora":
            self._olora_init(adapter_name)
        elif init == "orthogonal":
            new_a, new_b = lora_ops.orthogonal_factors(self.in_features, self.out_features, r, dtype, base_w.device)
            with torch.no_grad():
                a.weight.copy_(new_a)
                b.weight.copy_(new_b)
        else:
            lora_ops.init_factors(a.weight, b.weight, init, r)
        if getattr(config, "use_gating", False):  # Linear(in, 1), weight N(0, 0.02), PyTorch's default bias
            gate = nn.Linear(self.in_features, 1, device=base_w.device, dtype=dtype)
            nn.init.normal_(gate.weight, std=0.02)
            self.lora_gate[adapter_name] = gate
        if config.use_dora:
            weight = self._oriented_base_weight()
            norm = lora_ops.dora_weight_norm(weight, a.weight, b.weight, self.scaling[adapter_name])
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.to(dtype))

    def _oriented_base_weight(self) -> torch.Tensor:
        if _quant.is_quantized(self.get_base_layer()):  # a transient dequantised copy (DoRA norms), never stored
            return _quant.dequantize(self.get_base_layer(), adapter_dtype(self.get_base_layer().weight))
        w = self.get_base_layer().weight
        return w.t() if self.fan_in_fan_out else w

    def _pissa_init(self, adapter_name: str, init: str, residual_only: bool = False) -> None:
        """PiSSA: A, B from the top singular triplets of W, W replaced by the residual. ``residual_only``: the
        factors come from a checkpoint, only the base weight is made the residual (what PEFT does on load)."""
        base = self.get_base_layer()
        weight = self._oriented_base_weight()
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        niter = int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None
        new_a, new_b, residual = lora_ops.pissa_factors(weight, a.shape[0], self.scaling[adapter_name], niter)
        with torch.no_grad():
            if not residual_only:
                a.copy_(new_a)
                b.copy_(new_b)
            base.weight.copy_(residual.t() if self.fan_in_fan_out else residual)

    def _olora_init(self, adapter_name: str, residual_only: bool = False) -> None:
        """OLoRA: A, B from the QR decomposition of W, W replaced by the residual (``residual_only``: on load)."""
        base = self.get_base_layer()
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        new_a, new_b, residual = lora_ops.olora_factors(self._oriented_base_weight(), a.shape[0],
                                                        self.scaling[adapter_name])
        with torch.no_grad():
            if not residual_only:
                a.copy_(new_a)
                b.copy_(new_b)
            base.weight.copy_(residual.t() if self.fan_in_fan_out else residual)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        delta = (b @ a) * self.scaling[adapter_name]
        return delta.t() if self.fan_in_fan_out else delta

    def _dora_factor(self, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        adapted = weight + delta
        if self.fan_in_fan_out:
            return (self.lora_magnitude_vector[adapter_name] / adapted.norm(dim=0)).view(1, -1).to(weight.dtype)
        return (self.lora_magnitude_vector[adapter_name] / adapted.norm(dim=1)).view(-1, 1).to(weight.dtype)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        dropout = self.lora_dropout[adapter_name]
        scaling = self.scaling[adapter_name]
        gate = self.lora_gate[adapter_name] if adapter_name in self.lora_gate else None
        if gate is not None:  # the gate replaces lora_alpha / r: mean over the sequence of sigmoid(gate(x))
            scaling = torch.sigmoid(gate(x.to(gate.weight.dtype))).mean(dim=1, keepdim=True).to(x.dtype)
        if not self.use_dora[adapter_name]:
            return lora_ops.lora_linear_add(result, dropout(x), a, b, scaling)
        x_d = dropout(x)
        weight = self._oriented_base_weight()
        magnitude = self.lora_magnitude_vector[adapter_name]
        base_out = None if isinstance(dropout, nn.Identity) else F.linear(x_d, weight.to(x.dtype))
        bias = self.get_base_layer().bias
        return lora_ops.dora_linear(result, x_d, weight, bias, a, b, magnitude, scaling, base_out)

    # ---- fast paths. ``fast_path`` says which path the last forward took ("fused-lora", "fused-dora",
    # "stacked-mixed", or "reference: <why>"); the first time a layer declines the fused path it logs why at DEBUG.
    fast_path: str = ""

    def _set_path(self, path: str) -> None:
        if path == self.fast_path:  # (nn.Module.__setattr__ is slow enough to show in a step; skip no-op sets)
            return
        if lora_ops.compiling():  # a write during a traced forward would guard the graph on it: one recompile
            return
        if path.startswith("reference"):
            logger.debug("%s: LoRA fused path declined (%s)", type(self).__name__, path)
        self.fast_path = path

    def _decline_reason(self, x: torch.Tensor, names: Sequence[str]) -> Optional[str]:
        """Why the fused autograd node cannot serve this call (None if it can). Runs on every forward, so it
        reads the module dicts directly instead of going through nn.Module attribute lookup."""
        modules = self._modules
        reason = lora_ops.fused_linear_decline(modules["base_layer"], x)
        if reason is not None:
            return reason
        use_dora = self.use_dora
        if modules["lora_gate"] and any(n in modules["lora_gate"] for n in names):
            return "gated adapter (use_gating)"
        for n in names:
            if not use_dora[n]:
                continue
            if lora_ops.compiling():
                # the fused DoRA node checks the magnitude for zeros (data-dependent) and caches the weight norm
                # across calls; traced, the reference math is one graph and the compiler fuses it
                return "DoRA under torch.compile"
            if len(names) > 1:
                return "DoRA combined with other active adapters"
            if self.training and not isinstance(modules["lora_dropout"][n], nn.Identity):
                return "DoRA with dropout"
            m = self.lora_magnitude_vector[n]
            if torch.is_grad_enabled() and m.requires_grad and bool((m == 0).any()):
                return "a DoRA magnitude is exactly zero"
        return None

    def _w_sq(self) -> torch.Tensor:
        """Squared row norms of the (frozen) oriented base weight in float32, cached per weight version."""
        w = self.get_base_layer().weight
        key = (w.data_ptr(), w._version, w.device, self.fan_in_fan_out)
        cache = getattr(self, "_w_sq_cache", None)
        if cache is None or cache[0] != key:
            # a normal tensor even under torch.inference_mode(): it is reused by later training steps
            with torch.inference_mode(False), torch.no_grad():
                sq = torch.linalg.vector_norm(self._oriented_base_weight(), dim=1, dtype=torch.float32).square()
            self._w_sq_cache = cache = (key, sq)
        return cache[1]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training and hasattr(x, input_recompute._SOURCE) and not lora_ops.compiling():
            with input_recompute.recompute_input(x):  # x is a norm's output: keep (norm, its input) instead
                return super().forward(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        reason = self._decline_reason(x, names)
        if reason is not None:
            self._set_path(f"reference: {reason}")
            return super().forward_adapters(x, names, *args, **kwargs)
        base = self._modules["base_layer"]  # not nested: _decline_reason checked
        if self.use_dora[names[0]]:
            n = names[0]
            self._set_path("fused-dora")
            return lora_ops.dora_linear_fused(
                x, base.weight, base.bias, self._w_sq(), self.lora_A[n].weight, self.lora_B[n].weight,
                self.lora_magnitude_vector[n], self.scaling[n], self.fan_in_fan_out,
            )
        modules = self._modules
        lora_a, lora_b, dropout = modules["lora_A"], modules["lora_B"], modules["lora_dropout"]
        training = self.training
        factors, drop = [], []
        for n in names:
            factors.append((lora_a[n].weight, lora_b[n].weight, self.scaling[n]))
            d = dropout[n]
            drop.append(d.p if training and isinstance(d, nn.Dropout) else 0.0)
        one = len(factors) == 1 and not drop[0]
        self._set_path("triton-lora" if one and lora_ops.triton_linear_enabled(x) else "fused-lora")
        return lora_ops.lora_linear(x, base.weight, base.bias, factors, self.fan_in_fan_out, drop)

    def forward_mixed(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [n for n in batch.groups if n != BASE_ADAPTER and n in self.adapter_configs]
        if any(self.use_dora[n] for n in names) or (self.training and any(not isinstance(self.lora_dropout[n], nn.Identity) for n in names)):
            self._set_path("reference: mixed batch with DoRA or active dropout")
            return super().forward_mixed(x, batch, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not names:
            return result
        # a fixed order (the layer's own) keeps the stacked cache valid across calls with different batches
        order = [n for n in self.adapter_configs if n in self.lora_A]
        stack = lora_ops.stacked_factors(self, order, x.dtype)
        index = batch.index_tensor(order, x.device)
        if not (torch.is_grad_enabled() and (x.requires_grad or stack[0].requires_grad)) and kernels_enabled(x.device):
            self._set_path("triton-mixed")  # serving: gather-and-multiply kernels, factors read in place
            from peftkit.kernels.lora_mixed import mixed_lora_add_triton

            return mixed_lora_add_triton(result, x, stack, index)
        self._set_path("stacked-mixed")
        return lora_ops.mixed_lora_add(result, x, stack, index)


class Embedding(LoraLayer):
    """LoRA on ``nn.Embedding``: A is (r, num_embeddings), B is (embedding_dim, r)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str = "", loading: bool = False) -> None:
        r = self._set_hyper(adapter_name, config, module_name)
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith(("pissa", "olora", "orthogonal")):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is supported for linear layers only, "
                             f"not for nn.Embedding ({module_name}); exclude it from target_modules.")
        w = self.get_base_layer().weight
        dtype = adapter_dtype(w)
        a = torch.empty(r, self.in_features, device=w.device, dtype=dtype)
        b = torch.empty(self.out_features, r, device=w.device, dtype=dtype)
        if loading:
            a.zero_(); b.zero_()
        elif config.init_lora_weights is False:
            nn.init.normal_(a); nn.init.normal_(b)
        else:
            nn.init.zeros_(a); nn.init.normal_(b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(b)
        if config.use_dora:
            delta = (b @ a) * self.scaling[adapter_name]  # (dim, num_embeddings)
            norm = (w.t() + delta.to(w.dtype)).norm(dim=1)
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.to(dtype))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return (self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]).t() * self.scaling[adapter_name]

    def _dora_factor(self, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (self.lora_magnitude_vector[adapter_name] / (weight + delta).norm(dim=0)).view(1, -1).to(weight.dtype)

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a = self.lora_embedding_A[adapter_name]
        b = self.lora_embedding_B[adapter_name]
        scaling = self.scaling[adapter_name]
        lora = (self._embed(x, a.t()) @ b.t()).to(result.dtype) * scaling
        if not self.use_dora[adapter_name]:
            return result + lora
        w = self.get_base_layer().weight
        delta = (b @ a).detach() * scaling
        norm = (w.t() + delta.to(w.dtype)).norm(dim=1).detach()
        factor = (self.lora_magnitude_vector[adapter_name] / norm).to(result.dtype)
        return factor * result + factor * lora


class ConvNd(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base kernel (in -> r), B a 1x1 conv (r -> out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self._conv_cls = type(base_layer) if type(base_layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else {
            1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[base_layer.weight.dim() - 2]

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str = "", loading: bool = False) -> None:
        r = self._set_hyper(adapter_name, config, module_name)
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith(("pissa", "olora", "orthogonal")):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is supported for linear layers only, "
                             f"not for convolutions ({module_name}); exclude it from target_modules.")
        base = self.get_base_layer()
        dtype = adapter_dtype(base.weight)
        nd = base.weight.dim() - 2
        a = self._conv_cls(self.in_features, r, base.kernel_size, base.stride, base.padding, dilation=base.dilation,
                           bias=False, device=base.weight.device, dtype=dtype)
        # grouped base convolution (as in PEFT): A mixes all input channels, B maps rank to outputs per group
        b = self._conv_cls(r, self.out_features, (1,) * nd, (1,) * nd, groups=base.groups, bias=False,
                           device=base.weight.device, dtype=dtype)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        if loading:
            nn.init.zeros_(b.weight)
        else:
            lora_ops.init_factors(a.weight, b.weight, config.init_lora_weights, r)
        if config.use_dora:
            weight = base.weight + self.delta_weight(adapter_name).to(base.weight.dtype)
            norm = weight.norm(p=2, dim=_norm_dims(weight), keepdim=True).transpose(1, 0)
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.detach().to(dtype))

    def merge_refusal(self) -> Optional[str]:
        groups = self.get_base_layer().groups
        if groups > 1:
            return (f"LoRA on a grouped convolution (groups={groups}) cannot be merged into its weight (as in PEFT); "
                    "use it unmerged.")
        return None

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.merge_refusal():
            raise NotImplementedError(self.merge_refusal())
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        r = a.shape[0]
        base_shape = self.get_base_layer().weight.shape
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(base_shape) * self.scaling[adapter_name]

    def _dora_factor(self, adapter_name: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        adapted = weight + delta
        norm = adapted.norm(p=2, dim=_norm_dims(adapted), keepdim=True)  # (out, 1, ...)
        return (self.lora_magnitude_vector[adapter_name].transpose(1, 0) / norm).to(weight.dtype)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        dropout = self.lora_dropout[adapter_name]
        scaling = self.scaling[adapter_name]
        x_d = dropout(x)
        lora = b(a(x_d.to(a.weight.dtype))).to(result.dtype) * scaling
        if not self.use_dora[adapter_name]:
            return result + lora
        base = self.get_base_layer()
        weight = base.weight
        adapted = weight + self.delta_weight(adapter_name).detach().to(weight.dtype)
        norm = adapted.norm(p=2, dim=_norm_dims(adapted), keepdim=True).transpose(1, 0).detach()
        factor = (self.lora_magnitude_vector[adapter_name] / norm).to(result.dtype)
        if isinstance(dropout, nn.Identity):
            base_out = result
            if base.bias is not None:
                base_out = base_out - base.bias.view((1, -1) + (1,) * (result.dim() - 2))
        else:
            base_out = base._conv_forward(x_d, weight, None)
        return result + (factor - 1) * base_out + factor * lora


def create_lora_layer(target: nn.Module, adapter_name: str, config: LoraConfig, module_name: str = "", loading: bool = False) -> Optional[LoraLayer]:
    base = innermost_base(target)
    if isinstance(base, nn.Linear):
        if config.fan_in_fan_out:
            raise ValueError(f"fan_in_fan_out=True but {module_name} is an nn.Linear (stored as out x in); set it to False.")
        layer: LoraLayer = Linear(target, fan_in_fan_out=False)
    elif conv1d_cls() and isinstance(base, conv1d_cls()):
        layer = Linear(target, fan_in_fan_out=True)
    elif isinstance(base, nn.Embedding):
        layer = Embedding(target)
    elif isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if base.groups != 1:
            ranks = {pattern_value(config.rank_pattern, module_name, config.r)}
            if any(r % base.groups for r in ranks) or config.use_dora:
                raise ValueError(
                    f"LoRA on the grouped convolution {module_name} (groups={base.groups}) needs a rank divisible by "
                    f"groups and no DoRA; got r={ranks.pop()}{', use_dora=True' if config.use_dora else ''}."
                )
        layer = ConvNd(target)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


class LoraModel(AdapterModel):
    """The engine plus LoRA-only operations (weighted combination of adapters)."""

    def inject_adapter(self, adapter_name: str, config: Any, loading: bool = False) -> None:
        super().inject_adapter(adapter_name, config, loading=loading)
        input_recompute.tag_norm_outputs(self.model)  # LoRA layers recompute a norm's output, not keep it

    def _unwrap(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unwrap(*args, **kwargs)
        input_recompute.untag_norm_outputs(model)
        return model

    def after_adapter_loaded(self, adapter_name: str) -> None:
        """A checkpoint whose config says PiSSA holds trained factors of the principal part of W; as PEFT does, the
        base weights become the residual of W's SVD so that loading onto the original base model reproduces it."""
        init = self.peft_config[adapter_name].init_lora_weights
        if not (isinstance(init, str) and init.startswith(("pissa", "olora"))):
            return
        for _, layer in self.adapter_layers():
            if isinstance(layer, Linear) and adapter_name in layer.adapter_configs:
                if init == "olora":
                    layer._olora_init(adapter_name, residual_only=True)
                else:
                    layer._pissa_init(adapter_name, init, residual_only=True)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        density: Optional[float] = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Create ``adapter_name`` as a weighted combination of existing LoRA adapters.

        ``"cat"`` concatenates the factors (exact: delta = sum_i w_i delta_i); ``"linear"`` averages the factors
        (needs equal ranks; each factor pair weighted by sqrt(w_i * scaling_i), as in PEFT); ``"svd"`` truncates the
        SVD of sum_i w_i delta_i to ``svd_rank`` (default: the largest rank). ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"``, ``"magnitude_prune"`` merge the A and B factors (equal ranks) by task arithmetic: prune each
        to ``density`` (by magnitude; DARE at random, rescaled), weight by sqrt(w_i * scaling_i), and for TIES keep
        only entries whose sign agrees with the elected sign (``majority_sign_method`` "total" or "frequency").
        """
        from peftkit.methods.lora.lora_combine import add_weighted_adapter

        add_weighted_adapter(self, list(adapters), list(weights), adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, density=density, majority_sign_method=majority_sign_method)


LORA = register_method(
    MethodSpec(
        peft_type=PeftType.LORA.value,
        config_cls=LoraConfig,
        create_layer=create_lora_layer,
        prefix="lora_",
        model_cls=LoraModel,
        supports_quantized_base=True,
        default_target_modules={
            "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
            "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"],
            "vit": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
        },
    )
)
