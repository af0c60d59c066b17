"""LoRA (Hu et al., 2021) with rsLoRA scaling, DoRA (weight-decomposed LoRA) and PiSSA initialisation.

For a frozen weight W (out x in), adapter ``a`` adds ``scaling * B @ A`` with A: r x in, B: out x r and
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). DoRA rescales each output row of the
adapted weight to a learned magnitude: ``W' = m * (W + sBA) / ||W + sBA||_row``.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
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
from peftkit.engine.warnings import PeftWarning
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
    # data-aware initialisations (issue 17): LoftQ runs here; EVA and CorDA need data peftkit does not collect yet
    loftq_config: Union[dict, Any] = field(
        default_factory=dict,
        metadata={"help": "With init_lora_weights='loftq': LoftQConfig(loftq_bits=4|8, loftq_iter=n) or its dict."},
    )
    eva_config: Optional[Any] = field(default=None, metadata={"help": "EVA's settings (init_lora_weights='eva'); "
                                                                      "not supported by peftkit yet."})
    corda_config: Optional[Any] = field(default=None, metadata={"help": "CorDA's settings (init_lora_weights="
                                                                        "'corda'); not supported by peftkit yet."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module rank, keys are regexes."})
    alpha_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module alpha, keys are regexes."})
    # ---- PEFT 0.21 LoRA features (drop-in parity, issue 17)
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Parameters (not modules) to adapt, e.g. ['experts.gate_up_proj'] for MoE expert tensors: "
                  "full names or their '.'-suffixes; 2-d (out, in) or 3-d (experts, ., .) tensors. Set "
                  "target_modules=[] (or leave it unset) to adapt parameters only."},
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Train only these rows of an embedding (e.g. new tokens): a list of token ids (the input "
                  "embedding) or {layer name: ids}. A layer tied to the input embedding follows it."},
    )
    ensure_weight_tying: bool = field(
        default=False,
        metadata={"help": "With trainable_token_indices on a model with tied embeddings: require the tied layers to "
                  "share the trained rows (indices given for both must agree); warn if the model has no tie."},
    )
    # PEFT 0.21 LoraConfig fields of features peftkit does not have: accepted at their "unused" value (so that
    # configs and adapter_config.json files written by PEFT load), refused with a clear error otherwise
    # (see _UNSUPPORTED_LORA_FIELDS).
    layer_replication: Optional[list[tuple[int, int]]] = field(
        default=None, metadata={"help": "Rebuild the decoder's layer list from [start, end) ranges of its layers "
                                "(copies share base weights, each gets its own LoRA), e.g. [[0, 4], [2, 5]]."})
    use_qalora: bool = field(default=False, metadata={"help": "Not supported (QA-LoRA)."})
    qalora_group_size: int = field(default=16, metadata={"help": "QA-LoRA's group size (unused)."})
    alora_invocation_tokens: Optional[list[int]] = field(default=None, metadata={"help": "Not supported (aLoRA)."})
    use_bdlora: Optional[Any] = field(default=None, metadata={"help": "Not supported (BD-LoRA)."})
    velora_config: Optional[Any] = field(default=None, metadata={"help": "Not supported (VeLoRA)."})
    kasa_config: Optional[Any] = field(default=None, metadata={"help": "Not supported (KaSA)."})
    monteclora_config: Optional[Any] = field(default=None, metadata={"help": "Not supported (MonteCLoRA)."})
    arrow_config: Optional[Any] = field(default=None, metadata={"help": "Not supported (Arrow routing)."})
    lora_ga_config: Optional[Any] = field(default=None, metadata={"help": "Not supported (LoRA-GA)."})
    megatron_config: Optional[dict] = field(default=None, metadata={"help": "Not supported (Megatron-LM layers)."})
    megatron_core: Optional[str] = field(default="megatron.core", metadata={"help": "Megatron module (unused)."})
    auto_mapping: Optional[dict] = field(default=None, metadata={"help": "Written by PEFT for custom model classes; "
                                                                        "kept as metadata."})
    runtime_config: Optional[Any] = field(
        default=None, metadata={"help": "PEFT's LoraRuntimeConfig (ephemeral_gpu_offload); not saved. Offloading is "
                                "not supported: only ephemeral_gpu_offload=False is accepted."})
    lora_bias: bool = field(
        default=False,
        metadata={"help": "Give LoRA-B a bias (scaled like B; merged into the base layer's bias). Linear and conv "
                  "layers only; needs init_lora_weights True or False and no DoRA."},
    )

    # Checked by peftkit.engine.validation before the model is touched (types come from the annotations).
    field_rules: ClassVar[dict[str, Rule]] = {
        "r": Rule(min=1),
        "lora_alpha": Rule(type=float, min=-SCALE_LIMIT, max=SCALE_LIMIT),
        "lora_dropout": Rule(min=0.0, max=1.0, max_open=True),
        "rank_pattern": Rule(regex_keys=True, each=Rule(min=1)),
        "alpha_pattern": Rule(type=dict[str, float], regex_keys=True, each=Rule(min=-SCALE_LIMIT, max=SCALE_LIMIT)),
    }
    rank_fields: ClassVar[tuple[str, ...]] = ("r",)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("runtime_config", None)  # a runtime setting, not written to adapter_config.json (as in PEFT)
        return out

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
        _check_data_aware_init(self)
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "olora", "orthogonal", "loftq") or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
                "'pissa_niter_<n>', 'olora', 'orthogonal' or 'loftq'."
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
        for name, what in _UNSUPPORTED_LORA_FIELDS.items():
            value = getattr(self, name)
            if value is not None and value is not False:
                raise ValueError(f"LoraConfig.{name}={value!r}: {what} is not supported by peftkit; leave "
                                 f"{name} unset (None/False), or use Hugging Face PEFT for this variant.")
        offload = (self.runtime_config.get("ephemeral_gpu_offload") if isinstance(self.runtime_config, dict)
                   else getattr(self.runtime_config, "ephemeral_gpu_offload", False))
        if offload:
            raise ValueError("LoraConfig.runtime_config: ephemeral_gpu_offload=True is not supported by peftkit (no "
                             "CPU-offloaded bases); leave it False.")
        if isinstance(self.target_parameters, str):
            raise TypeError("LoraConfig.target_parameters must be a list of parameter names (e.g. ['lin0.weight']) "
                            "or None, not a string.")
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
        if self.lora_bias:
            if init not in (True, False):
                raise ValueError(f"LoraConfig.lora_bias=True needs init_lora_weights=True or False, got "
                                 f"init_lora_weights={init!r}.")
            if self.use_dora:
                raise ValueError("LoraConfig.lora_bias=True cannot be combined with use_dora=True (as in PEFT); "
                                 "set one of them to False.")


_UNSUPPORTED_LORA_FIELDS = {
    "use_qalora": "QA-LoRA (quantisation-aware LoRA)",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "BD-LoRA (block-diagonal LoRA)",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing of LoRA experts",
    "lora_ga_config": "LoRA-GA initialisation",
    "megatron_config": "LoRA on Megatron-LM parallel layers",
}


def _check_data_aware_init(config: "LoraConfig") -> None:
    """init_lora_weights 'loftq' / 'eva' / 'corda' and their sub-configs, with PEFT's rules and messages."""
    init = config.init_lora_weights
    if init in ("eva", "corda"):
        need = ("initialize_lora_eva_weights(model, dataloader) (activation SVD of each layer's inputs)" if init == "eva"
                else "preprocess_corda(model, config, run_model) (covariance of each layer's inputs)")
        raise NotImplementedError(
            f"init_lora_weights={init!r} is not supported by peftkit yet: it needs data, through PEFT's {need}. "
            "Initialise the adapter with Hugging Face PEFT and load the saved adapter with peftkit "
            "(PeftModel.from_pretrained), or use init_lora_weights='pissa' / 'olora' (from the weights alone)."
        )
    if config.eva_config is not None or config.corda_config is not None:
        import warnings

        which = "eva_config" if config.eva_config is not None else "corda_config"
        warnings.warn(f"`{which}` specified but will be ignored when `init_lora_weights` is not "
                      f"'{which.split('_')[0]}'.")
        config.eva_config = config.corda_config = None
    if init == "loftq":
        from peftkit.methods.lora.loftq import check_loftq_settings

        if not config.loftq_config:
            raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
        if not isinstance(config.loftq_config, dict):
            config.loftq_config = dict(vars(config.loftq_config))
        check_loftq_settings(config.loftq_config.get("loftq_bits", 4), config.loftq_config.get("loftq_iter", 1))
        if config.use_dora:
            raise ValueError("init_lora_weights='loftq' cannot be combined with use_dora.")
    elif config.loftq_config:
        import warnings

        config.loftq_config = {}
        warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")


# ------------------------------------------------------------------------------------------------ math
def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _norm_dims(weight: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, weight.dim()))


def fused_qkv_parts(config: Any, module_name: str, out_features: int) -> tuple[int, ...]:
    """Which thirds (0 q, 1 k, 2 v) of a fused q/k/v projection get LoRA factors of their own, for a config with
    ``fused_qkv_matrices`` (AdapterHub's LoRA, e.g. in UniPELT) on GPT-2's ``c_attn``; () otherwise."""
    matrices = getattr(config, "fused_qkv_matrices", None)
    if not matrices or module_name.rsplit(".", 1)[-1] != "c_attn" or out_features % 3:
        return ()
    return tuple(i for i, m in enumerate("qkv") if m in matrices)


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
        self.lora_qkv_parts: dict[str, tuple[int, ...]] = {}  # AdapterHub's LoRA on a fused q/k/v (GPT-2's c_attn)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._dora_merge_norm: dict[str, torch.Tensor] = {}

    def _set_hyper(self, adapter_name: str, config: LoraConfig, module_name: str) -> int:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = lora_scaling(alpha, r, config.use_rslora)
        self.use_dora[adapter_name] = bool(config.use_dora)
        self.lora_bias[adapter_name] = bool(getattr(config, "lora_bias", False))
        p = float(config.lora_dropout)
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        return r

    # PEFT's names: the per-adapter attributes besides the trainable containers (adapter_layer_names)
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __repr__(self) -> str:  # "lora.Linear(...)", as PEFT prints its layers
        return "lora." + super().__repr__()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.r, self.lora_alpha, self.scaling, self.use_dora, self._dora_merge_norm, self.lora_qkv_parts,
                  self.lora_bias):
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
        if not self.merged_adapters:
            factor = self._dora_factor(adapter_name, weight, delta)
            self._dora_merge_norm[adapter_name] = factor
            return factor * (weight + delta)
        # Other adapters are merged already: DoRA's norm is taken from the unmerged base weight W0, as the forward
        # pass computes it, and the merge adds what the forward adds, (factor - 1) W0 + factor delta
        base = self._unmerged_base(weight, self.merged_adapters)
        factor = self._dora_factor(adapter_name, base, delta)
        self._dora_merge_norm[adapter_name] = factor
        return weight + (factor - 1) * base + factor * delta

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(adapter_name).to(weight.dtype)
        if not self.use_dora.get(adapter_name):
            return weight - delta
        if not self.merged_adapters:
            factor = self._dora_merge_norm.pop(adapter_name)
            return weight / factor - delta
        base = self._unmerged_base(weight, list(self.merged_adapters) + [adapter_name])
        factor = self._dora_merge_norm.pop(adapter_name)
        return weight - (factor - 1) * base - factor * delta

    def _unmerged_base(self, weight: torch.Tensor, merged: Sequence[str]) -> torch.Tensor:
        """W0 from a weight holding the merges of ``merged``: W = W0 (1 + sum over DoRA (f - 1)) + sum f delta
        (f = 1 for plain LoRA), solved per output channel with the factors stored at merge time."""
        num, den = weight, None
        for name in merged:
            delta = self.delta_weight(name).to(weight.dtype)
            if self.use_dora.get(name):
                f = self._dora_merge_norm[name]
                num = num - f * delta
                den = f if den is None else den + (f - 1)
            else:
                num = num - delta
        return num if den is None else num / den

    # ---- lora_bias: LoRA-B's bias (times the scaling) is added to the output and merged into the base bias
    def _warn_if_bias_unmergeable(self, adapter_name: str) -> None:
        if self.lora_bias.get(adapter_name) and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type {type(self.get_base_layer()).__name__} "
                "has no bias. This means that merging LoRA weights won't be possible.",
                PeftWarning,
            )

    def bias_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        """What merging ``adapter_name`` adds to the base layer's bias (None without lora_bias)."""
        if not self.lora_bias.get(adapter_name):
            return None
        return self.lora_B[adapter_name].bias * self.scaling[adapter_name]

    def merge_refusal(self) -> Optional[str]:
        if any(self.lora_bias.values()) and getattr(self.get_base_layer(), "bias", None) is None:
            return ("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias; use the "
                    "adapter unmerged, or give the base layer a bias before adding the adapter.")
        return None

    def first_nonfinite_merge(self, adapter_names: Sequence[str]) -> Optional[str]:
        bad = super().first_nonfinite_merge(adapter_names)
        if bad is not None:
            return bad
        bias = getattr(self.get_base_layer(), "bias", None)
        if bias is None:
            return None
        with torch.no_grad():
            new = bias.data
            for name in adapter_names:
                delta = self.bias_delta(name) if name in self.adapter_configs and name not in self.merged_adapters else None
                if delta is not None:
                    new = new + delta.to(new.dtype)
                    if not torch.isfinite(new).all():
                        return name
        return None

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        todo = [n for n in names if n in self.adapter_configs and n not in self.merged_adapters]
        if any(self.lora_bias.get(n) for n in todo):
            base = self.get_base_layer()
            if getattr(base, "bias", None) is None:
                raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias; "
                                   "use the adapter unmerged.")
            if safe_merge and self.first_nonfinite_merge(todo) is not None:
                raise ValueError(f"NaNs detected in the merged weights: merging adapter {self.first_nonfinite_merge(todo)!r} "
                                 "would put NaN or inf into the base weights or bias; nothing was changed.")
        done = len(self.merged_adapters)
        super().merge(adapter_names, safe_merge=safe_merge)
        for name in self.merged_adapters[done:]:
            delta = self.bias_delta(name)
            if delta is not None:
                bias = self.get_base_layer().bias
                with torch.no_grad():
                    bias.data.add_(delta.to(bias.dtype))

    def unmerge(self) -> None:
        merged = list(self.merged_adapters)
        super().unmerge()
        for name in merged:
            delta = self.bias_delta(name)
            if delta is not None:
                bias = self.get_base_layer().bias
                with torch.no_grad():
                    bias.data.sub_(delta.to(bias.dtype))


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
        parts = fused_qkv_parts(config, module_name, self.out_features)
        if parts:  # one rank-r factor pair per enabled third (AdapterHub's LoRAMergedLinear): A stacked, B stacked
            if self.lora_bias[adapter_name]:
                raise ValueError(f"LoraConfig.lora_bias is not supported with LoRA on slices of a fused q/k/v "
                                 f"({module_name}); set lora_bias=False.")
            self.lora_qkv_parts[adapter_name] = parts
        n = len(parts) or 1
        a = nn.Linear(self.in_features, r * n, bias=False, device=base_w.device, dtype=dtype)
        b = nn.Linear(r, self.out_features // 3 * n if parts else self.out_features, bias=self.lora_bias[adapter_name],
                      device=base_w.device, dtype=dtype)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self._warn_if_bias_unmergeable(adapter_name)
        init = config.init_lora_weights
        if b.bias is not None and (loading or init is not False):
            nn.init.zeros_(b.bias)  # init_lora_weights=False keeps nn.Linear's random bias (as in PEFT)
        if loading:
            nn.init.zeros_(b.weight)  # overwritten by the checkpoint; keep creation cheap and data-independent
        elif isinstance(init, str) and init.startswith("pissa"):
            if _quant.is_quantized(self.get_base_layer()):
                raise ValueError(f"PiSSA initialisation rewrites the base weight of {module_name or 'the layer'}, "
                                 "which is quantised here; initialise PiSSA on the unquantised model instead.")
            self._pissa_init(adapter_name, init)
        elif init == "olora":
            self._olora_init(adapter_name)
        elif init == "loftq":
            self._loftq_init(adapter_name, config, module_name)
        elif init == "orthogonal":
            new_a, new_b = lora_ops.orthogonal_factors(self.in_features, self.out_features, r, dtype, base_w.device)
            with torch.no_grad():
                a.weight.copy_(new_a)
                b.weight.copy_(new_b)
        else:
            lora_ops.init_factors(a.weight, b.weight, init, r)
        if getattr(config, "use_gating", False):  # Linear(in, 1), weight N(0, 0.02), PyTorch's default bias
            gate = nn.Linear(self.in_features, n, device=base_w.device, dtype=dtype)  # one per part (fused q/k/v)
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

    def _loftq_init(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        """LoftQ (see peftkit.methods.lora.loftq): the base weight becomes its dequantised quantisation Q, A and B
        fit what Q lost."""
        from peftkit.methods.lora.loftq import loftq_factors

        base = self.get_base_layer()
        if _quant.is_quantized(base):
            raise ValueError(f"init_lora_weights='loftq' needs the unquantised weight of {module_name or 'the layer'} "
                             "(it quantises it itself); load the base model without quantisation.")
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        settings = config.loftq_config
        new_a, new_b, q = loftq_factors(self._oriented_base_weight(), a.shape[0], self.scaling[adapter_name],
                                        settings.get("loftq_bits", 4), settings.get("loftq_iter", 1))
        with torch.no_grad():
            a.copy_(new_a)
            b.copy_(new_b)
            base.weight.copy_(q.t() if self.fan_in_fan_out else q)

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
        if adapter_name in self.lora_qkv_parts:  # block-diagonal B over the enabled thirds of the output
            parts, r = self.lora_qkv_parts[adapter_name], self.r[adapter_name]
            third = self.out_features // 3
            full = b.new_zeros(self.out_features, r * len(parts))
            for i, p in enumerate(parts):
                full[p * third:(p + 1) * third, i * r:(i + 1) * r] = b[i * third:(i + 1) * third]
            b = full
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
        if adapter_name in self.lora_qkv_parts:
            return result + self._fused_qkv_delta(adapter_name, dropout(x), a, b, scaling)
        if not self.use_dora[adapter_name]:
            out = lora_ops.lora_linear_add(result, dropout(x), a, b, scaling)
            b_bias = self.lora_B[adapter_name].bias
            return out if b_bias is None else out + (b_bias * scaling).to(out.dtype)
        x_d = dropout(x)
        weight = self._oriented_base_weight()
        magnitude = self.lora_magnitude_vector[adapter_name]
        base_out = None if isinstance(dropout, nn.Identity) else F.linear(x_d, weight.to(x.dtype))
        bias = self.get_base_layer().bias
        return lora_ops.dora_linear(result, x_d, weight, bias, a, b, magnitude, scaling, base_out)

    def _fused_qkv_delta(self, adapter_name: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         scaling: Any) -> torch.Tensor:
        """AdapterHub's LoRA on a fused q/k/v output: part i (of the enabled thirds) gets
        ``x A_i^T B_i^T * s_i``, s_i = alpha / r or gate output i; the other thirds get nothing."""
        parts, r, third = self.lora_qkv_parts[adapter_name], self.r[adapter_name], self.out_features // 3
        h = x @ a.t().to(x.dtype)
        pieces = [x.new_zeros(*x.shape[:-1], third) for _ in range(3)]
        for i, p in enumerate(parts):
            d = h[..., i * r:(i + 1) * r] @ b[i * third:(i + 1) * third].t().to(x.dtype)
            pieces[p] = d * (scaling[..., i:i + 1] if isinstance(scaling, torch.Tensor) else scaling)
        return torch.cat(pieces, dim=-1)

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
        if self.lora_qkv_parts and any(n in self.lora_qkv_parts for n in names):
            return "LoRA on slices of a fused q/k/v"
        if any(self.lora_bias.get(n) for n in names):
            return "lora_bias (LoRA-B has a bias)"
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
        if any(self.use_dora[n] or self.lora_bias.get(n) for n in names) or (self.training and any(not isinstance(self.lora_dropout[n], nn.Identity) for n in names)):
            self._set_path("reference: mixed batch with DoRA, lora_bias or active dropout")
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
        if getattr(config, "lora_bias", False):
            raise ValueError(f"lora_bias=True is not supported for nn.Embedding ({module_name}), as in PEFT; exclude "
                             "it from target_modules or set lora_bias=False.")
        r = self._set_hyper(adapter_name, config, module_name)
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith(("pissa", "olora", "orthogonal", "loftq")):
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
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith(("pissa", "olora", "orthogonal", "loftq")):
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} is supported for linear layers only, "
                             f"not for convolutions ({module_name}); exclude it from target_modules.")
        base = self.get_base_layer()
        dtype = adapter_dtype(base.weight)
        nd = base.weight.dim() - 2
        a = self._conv_cls(self.in_features, r, base.kernel_size, base.stride, base.padding, dilation=base.dilation,
                           bias=False, device=base.weight.device, dtype=dtype)
        # grouped base convolution (as in PEFT): A mixes all input channels, B maps rank to outputs per group
        b = self._conv_cls(r, self.out_features, (1,) * nd, (1,) * nd, groups=base.groups,
                           bias=self.lora_bias[adapter_name], device=base.weight.device, dtype=dtype)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self._warn_if_bias_unmergeable(adapter_name)
        if b.bias is not None and (loading or config.init_lora_weights is not False):
            nn.init.zeros_(b.bias)
        if loading:
            nn.init.zeros_(b.weight)
        else:
            lora_ops.init_factors(a.weight, b.weight, config.init_lora_weights, r)
        if config.use_dora:
            weight = base.weight + self._flat_delta(adapter_name).to(base.weight.dtype)
            norm = weight.norm(p=2, dim=_norm_dims(weight), keepdim=True).transpose(1, 0)
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.detach().to(dtype))

    def merge_refusal(self) -> Optional[str]:
        groups = self.get_base_layer().groups
        if groups > 1:
            return (f"LoRA on a grouped convolution (groups={groups}) cannot be merged into its weight (as in PEFT); "
                    "use it unmerged.")
        return super().merge_refusal()

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        groups = self.get_base_layer().groups
        if groups > 1:
            raise NotImplementedError(f"LoRA on a grouped convolution (groups={groups}) cannot be merged into its "
                                      "weight (as in PEFT); use it unmerged.")
        return self._flat_delta(adapter_name)

    def _flat_delta(self, adapter_name: str) -> torch.Tensor:
        """scaling * (B viewed as (-1, r)) @ (A viewed as (r, -1)), in the base weight's shape: the delta weight for
        groups=1. For a grouped convolution it is not the layer's delta (that one has no dense form here) but the
        term DoRA's weight norm uses, the same as PEFT's, so magnitudes trained there transfer unchanged."""
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
        if self.cast_input_dtype_enabled:  # off inside peftkit.helpers.disable_input_dtype_casting
            x_d = x_d.to(a.weight.dtype)
        lora = b(a(x_d)).to(result.dtype) * scaling
        if not self.use_dora[adapter_name]:
            return result + lora
        base = self.get_base_layer()
        weight = base.weight
        adapted = weight + self._flat_delta(adapter_name).detach().to(weight.dtype)
        norm = adapted.norm(p=2, dim=_norm_dims(adapted), keepdim=True).transpose(1, 0).detach()
        factor = (self.lora_magnitude_vector[adapter_name] / norm).to(result.dtype)
        if isinstance(dropout, nn.Identity):
            base_out = result
            if base.bias is not None:
                base_out = base_out - base.bias.view((1, -1) + (1,) * (result.dim() - 2))
        else:
            base_out = base._conv_forward(x_d, weight, None)
        return result + (factor - 1) * base_out + factor * lora


class _MhaOutProj(Linear):
    """The LoRA layer on an ``nn.MultiheadAttention``'s out_proj. Its delta counts twice: PEFT 0.21 adds the
    out_proj delta to the weight and then merges the out_proj layer as well (in every forward and in merges), so a
    PEFT-trained adapter holds factors for 2 * scaling * B @ A; doubling here keeps outputs identical given the
    same checkpoint (see README, departures)."""

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return 2 * super().delta_weight(adapter_name)


class MultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention`` (as PEFT): one adapter on the packed input projection ``in_proj_weight``
    (A: r x embed_dim, B: 3*embed_dim x r) and one on ``out_proj`` (a LoRA :class:`Linear` put in its place). The
    module's own forward runs unchanged while both weights read as ``W + delta`` (a parametrization held for the
    call), so gradients reach the factors. Only ``_qkv_same_embed_dim`` modules (query, key, value of one size).
    Checkpoint keys: ``<m>.lora_A.weight``, ``<m>.lora_B.weight``, ``<m>.base_layer.out_proj.lora_A.weight``, ..."""

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        if not base._qkv_same_embed_dim:
            raise ValueError(f"LoRA on nn.MultiheadAttention ({module_name}) needs query, key and value of the same "
                             "size (kdim = vdim = embed_dim), as in PEFT; exclude this module from target_modules.")
        if not isinstance(innermost_base(base.out_proj), nn.Linear):
            raise TypeError(f"LoRA on nn.MultiheadAttention ({module_name}) needs out_proj to be an nn.Linear.")
        self.in_features, self.out_features = base.embed_dim, 3 * base.embed_dim
        if not isinstance(base.out_proj, LoraLayer):
            base.out_proj = _MhaOutProj(base.out_proj, fan_in_fan_out=False)

    def __getattr__(self, name: str) -> Any:  # embed_dim, num_heads, batch_first, ... of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(innermost_base(self._modules["base_layer"]), name)

    @property
    def out_proj_layer(self) -> "Linear":
        return self.get_base_layer().out_proj

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str = "", loading: bool = False) -> None:
        if config.use_dora:
            raise ValueError(f"LoRA on nn.MultiheadAttention ({module_name}) does not support DoRA (as in PEFT); set "
                             "use_dora=False or exclude this module.")
        if getattr(config, "lora_bias", False):
            raise ValueError(f"LoRA on nn.MultiheadAttention ({module_name}) does not support lora_bias=True.")
        init = config.init_lora_weights
        if init not in (True, False, "gaussian"):
            raise ValueError(f"LoRA on nn.MultiheadAttention ({module_name}) supports init_lora_weights True, False "
                             f"or 'gaussian', got {init!r}.")
        r = self._set_hyper(adapter_name, config, module_name)
        w = self.get_base_layer().in_proj_weight
        dtype = adapter_dtype(w)
        a = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        if loading:
            nn.init.zeros_(b.weight)
        else:
            lora_ops.init_factors(a.weight, b.weight, init, r)
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        out = self.out_proj_layer
        out.update_layer(adapter_name, config, module_name=f"{module_name}.out_proj" if module_name else "out_proj",
                         loading=loading)
        out.adapter_configs[adapter_name] = config

    def _weight_param(self) -> nn.Parameter:
        return self.get_base_layer().in_proj_weight

    def _base_weight_matrix(self) -> torch.Tensor:
        return self.get_base_layer().in_proj_weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return (b @ a) * self.scaling[adapter_name]

    def set_adapter(self, names: Sequence[str], inference_mode: bool = False) -> None:
        super().set_adapter(names, inference_mode=inference_mode)

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        from peftkit.methods.lora.param_wrapper import added_delta

        base = self.get_base_layer()
        w = base.in_proj_weight
        delta_in = sum(self.delta_weight(n).to(w.dtype) for n in names)
        out = self.out_proj_layer
        out_names = [n for n in out.active_adapters if n in out.adapter_configs and n not in out.merged_adapters
                     and not out.adapters_disabled]
        out_base = out.get_base_layer()
        delta_out = sum(out.delta_weight(n).to(out_base.weight.dtype) for n in out_names) if out_names else None
        with added_delta(base, "in_proj_weight", delta_in), added_delta(out_base, "weight", delta_out):
            return self.base_layer(x, *args, **kwargs)

    def forward_mixed(self, x: torch.Tensor, batch: MixedBatch, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("lora.MultiheadAttention does not support mixed adapter batches (adapter_names=, one "
                        "adapter per row), as in PEFT; use one adapter per call.")


class Conv1d(ConvNd):
    """LoRA on ``nn.Conv1d`` (PEFT's name; the layer is :class:`ConvNd`)."""


class Conv2d(ConvNd):
    """LoRA on ``nn.Conv2d`` (PEFT's name; the layer is :class:`ConvNd`)."""


class Conv3d(ConvNd):
    """LoRA on ``nn.Conv3d`` (PEFT's name; the layer is :class:`ConvNd`)."""


_CONV_LAYERS = {1: Conv1d, 2: Conv2d, 3: Conv3d}


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
    elif isinstance(base, nn.MultiheadAttention):
        layer = MultiheadAttention(target, module_name=module_name)
    elif isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if base.groups != 1:
            ranks = {pattern_value(config.rank_pattern, module_name, config.r)}
            if any(r % base.groups for r in ranks):
                raise ValueError(
                    f"LoRA on the grouped convolution {module_name} (groups={base.groups}) needs a rank divisible by "
                    f"groups (as in PEFT 0.21); got r={ranks.pop()}. Choose such a rank (rank_pattern can set it for "
                    "this layer) or exclude the layer from target_modules."
                )
        layer = _CONV_LAYERS.get(base.weight.dim() - 2, ConvNd)(target)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name=module_name, loading=loading)
    return layer


class LoraModel(AdapterModel):
    """The engine plus LoRA-only operations (weighted combination of adapters)."""

    def inject_parameter_targets(self, adapter_name: str, config: LoraConfig, loading: bool = False) -> int:
        from peftkit.methods.lora.param_wrapper import inject_parameter_targets
        from peftkit.methods.lora.trainable_tokens import inject_trainable_tokens

        count = inject_parameter_targets(self, adapter_name, config, loading=loading)
        return count + inject_trainable_tokens(self, adapter_name, config, loading=loading)

    def inject_adapter(self, adapter_name: str, config: LoraConfig, loading: bool = False) -> None:
        if not getattr(config, "layer_replication", None):
            super().inject_adapter(adapter_name, config, loading=loading)
        else:
            from peftkit.methods.lora.layer_replication import replicate_layers, undo_replication

            saved = replicate_layers(self.model, config.layer_replication)
            try:
                super().inject_adapter(adapter_name, config, loading=loading)
            except Exception:
                undo_replication(self.model, saved)
                raise
        if _quant._quantized_model(self.model):
            # on a quantized base (QLoRA, where memory is the point) LoRA layers recompute a norm's output in
            # backward instead of keeping it; full-precision bases keep the plain, faster path
            input_recompute.tag_norm_outputs(self.model)

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        if any(getattr(c, "layer_replication", None) for c in self.peft_config.values()):
            raise ValueError("Cannot merge LoRA layers when base model layers are replicated (layer_replication): "
                             "the copies share their base weights; use the adapters unmerged.")
        super().merge_adapter(adapter_names, safe_merge=safe_merge)

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        from peftkit.methods.lora.trainable_tokens import TrainableTokensWrapper

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for path, module in self.model.named_modules():  # checked before anything changes
            if isinstance(module, TrainableTokensWrapper):
                module.check_set_adapter(names, path)
        super().set_adapter(adapter_names, inference_mode=inference_mode)

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
