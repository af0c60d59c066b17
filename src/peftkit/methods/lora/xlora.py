"""X-LoRA (Buehler & Buehler, 2024): a mixture of frozen LoRA experts mixed per token and per layer by a trained gate.

Each forward of the model runs twice:

1. the *scaling pass* (no gradients): every expert is weighted by ``scaling_pass_value`` (0 by default, i.e. the
   plain base model); the last hidden state (batch, seq, hidden) goes through the gate, which predicts scalings of
   shape (batch, seq, n_layers, n_experts) (one set shared by all layers unless ``layerwise_scalings``), softmaxed
   with ``softmax_temperature`` when ``enable_softmax``;
2. the *real pass*: adapted layer ``l`` outputs ``W x + global_scaling_weight * sum_e s[b, t, l, e] * scaling_e *
   B_e A_e x`` with the optional top-k (``top_k_lora``, then a softmax over the kept experts when
   ``enable_softmax_topk``) applied per token and layer.

The scalings reach the layers through an attribute (``xlora_scalings``) set on each layer by forward hooks on the
wrapped model at every call (so ``generate()`` gets the two passes at every step too); no global state. After a
gradient-enabled call the layers keep them until the next call, for activation checkpointing's recomputation. Only the
gate is trained and saved (with the config, under PEFT's key names, so PEFT's X-LoRA reads it given the same
``adapters``); the experts are not copied: they are read from the LoRA checkpoints named in ``adapters``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.config import PeftConfig, PeftType
from peftkit.engine.validation import SCALE_LIMIT, Rule
from peftkit.engine.io import read_checkpoint
from peftkit.engine.layer import AdapterLayer
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.engine.save_load import CHECKPOINT_PREFIX
from peftkit.engine.targeting import ALL_LINEAR, expand_all_linear, find_targets
from peftkit.engine.tuner import AdapterModel, _get_parent
from peftkit.methods.common import adapter_dtype, conv1d_cls, pattern_value
from peftkit.methods.lora.lora import LoraConfig, lora_scaling

CACHE_KWARGS = ("cache", "past_key_values")  # the KV-cache argument, new and old transformers names
GATE_NAME = "internal_xlora_classifier"  # Hugging Face PEFT's attribute name, kept for familiar state-dict keys


@dataclass
class XLoraConfig(PeftConfig):
    """Configuration of an X-LoRA model; field names and meanings follow Hugging Face PEFT."""

    hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Hidden size of the base model (the gate's input); read from the model if unset."}
    )
    adapters: Optional[dict[str, str]] = field(
        default=None, metadata={"help": "Expert name -> folder (or hub id) of a LoRA checkpoint. Required."}
    )
    enable_softmax: bool = field(default=True, metadata={"help": "Softmax over experts of the gate's output."})
    enable_softmax_topk: bool = field(
        default=False, metadata={"help": "Softmax over the top_k_lora kept experts only (needs top_k_lora)."}
    )
    layerwise_scalings: bool = field(
        default=False, metadata={"help": "One set of scalings per adapted layer instead of one shared by all layers."}
    )
    xlora_depth: int = field(default=1, metadata={"help": "Number of linear layers of the gate."})
    xlora_size: int = field(default=2048, metadata={"help": "Hidden width of the gate (xlora_depth > 1)."})
    xlora_dropout_p: float = field(default=0.2, metadata={"help": "Dropout between the gate's layers (xlora_depth > 1)."})
    use_trainable_adapters: bool = field(default=False, metadata={"help": "Also train the LoRA experts."})
    softmax_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; lower is sharper."})
    top_k_lora: Optional[int] = field(default=None, metadata={"help": "Keep only the k largest scalings per token."})
    scaling_pass_value: float = field(
        default=0.0, metadata={"help": "Weight of every expert during the scaling pass (0: the plain base model)."}
    )
    global_scaling_weight: float = field(default=1.0, metadata={"help": "Multiplies every expert's output."})

    field_rules: ClassVar[dict[str, Rule]] = {
        "adapters": Rule(type=Optional[dict[str, Union[str, os.PathLike]]]), "hidden_size": Rule(min=1), "xlora_depth": Rule(min=1),
        "xlora_size": Rule(min=1), "xlora_dropout_p": Rule(min=0.0, max=1.0, max_open=True),
        "softmax_temperature": Rule(min=0.0, min_open=True), "top_k_lora": Rule(min=1),
        "scaling_pass_value": Rule(min=-SCALE_LIMIT, max=SCALE_LIMIT),
        "global_scaling_weight": Rule(min=-SCALE_LIMIT, max=SCALE_LIMIT),
    }

    def __post_init__(self) -> None:
        self.peft_type = PeftType.XLORA
        super().__post_init__()
        if not self.adapters or not isinstance(self.adapters, dict):
            raise ValueError(
                "XLoraConfig.adapters must map expert names to LoRA checkpoint folders, e.g. "
                "{'math': './lora_math', 'code': './lora_code'}; got " + repr(self.adapters) + "."
            )
        self.adapters = {str(k): os.fspath(v) for k, v in self.adapters.items()}
        if self.hidden_size is not None and (not isinstance(self.hidden_size, int) or self.hidden_size <= 0):
            raise ValueError(f"hidden_size must be a positive integer, got {self.hidden_size!r}.")
        if not isinstance(self.xlora_depth, int) or self.xlora_depth < 1:
            raise ValueError(f"xlora_depth must be an integer >= 1, got {self.xlora_depth!r}.")
        if self.xlora_depth > 1 and (not isinstance(self.xlora_size, int) or self.xlora_size < 1):
            raise ValueError(f"xlora_size must be a positive integer, got {self.xlora_size!r}.")
        if not 0.0 <= float(self.xlora_dropout_p) < 1.0:
            raise ValueError(f"xlora_dropout_p must be in [0, 1), got {self.xlora_dropout_p!r}.")
        if not float(self.softmax_temperature) > 0:
            raise ValueError(f"softmax_temperature must be > 0, got {self.softmax_temperature!r}.")
        if self.top_k_lora is not None and not (1 <= int(self.top_k_lora) <= len(self.adapters)):
            raise ValueError(
                f"top_k_lora must be between 1 and the number of experts ({len(self.adapters)}), got {self.top_k_lora!r}."
            )
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ValueError("enable_softmax_topk needs top_k_lora (the number of experts kept per token).")


# ------------------------------------------------------------------------------------------------ math
def _reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model checkpoints its blocks with torch's reentrant variant."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(fn, "keywords", {}).get("use_reentrant", True):
                return True
    return False


def gate_scalings(logits: torch.Tensor, n_layers: int, n_experts: int, config: XLoraConfig) -> torch.Tensor:
    """Gate output (batch, seq, n_experts or n_layers * n_experts) -> scalings (batch, seq, n_layers, n_experts)."""
    b, s = logits.shape[:2]
    if not config.layerwise_scalings:
        logits = logits.unsqueeze(2).expand(-1, -1, n_layers, -1)
    scalings = logits.reshape(b, s, n_layers, n_experts)
    if config.enable_softmax:
        scalings = torch.softmax(scalings / config.softmax_temperature, dim=-1)
    return scalings


def effective_scalings(scalings: torch.Tensor, config: XLoraConfig) -> torch.Tensor:
    """What the layers apply: top-k per token and layer (others zeroed), optional softmax over the kept experts,
    times ``global_scaling_weight``. Shape unchanged: (batch, seq, n_layers, n_experts)."""
    if config.top_k_lora is not None:
        _, keep = torch.topk(scalings, k=int(config.top_k_lora), dim=-1)
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, keep, True)
        scalings = scalings * mask.to(scalings.dtype)
    if config.enable_softmax_topk:
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings * config.global_scaling_weight


class XLoraGate(nn.Module):
    """The classifier: hidden state (batch, seq, hidden) -> logits, an MLP laid out as in Hugging Face PEFT
    (``layers.<i>``: Linear, ReLU[, Dropout] repeated ``xlora_depth - 1`` times, then the output Linear)."""

    def __init__(self, config: XLoraConfig, hidden_size: int, n_layers: int, n_experts: int) -> None:
        super().__init__()
        out = n_experts * n_layers if config.layerwise_scalings else n_experts
        mods: list[nn.Module] = []
        width = hidden_size
        for _ in range(config.xlora_depth - 1):
            mods += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                mods.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        mods.append(nn.Linear(width, out))
        self.layers = nn.Sequential(*mods)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden)


# ------------------------------------------------------------------------------------------------ layers
class XLoraLayer(AdapterLayer):
    """A base module plus frozen LoRA experts mixed by ``xlora_scalings`` (batch, seq, n_experts), which the model
    sets for the duration of each call. Experts live in ``lora_A`` / ``lora_B`` (or ``lora_embedding_*``) keyed
    by expert name, in the gate's expert order."""

    def __init__(self, base_layer: nn.Module, layer_index: int) -> None:
        super().__init__(base_layer)
        self.layer_index = layer_index
        self.experts: list[str] = []
        self.expert_scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.xlora_scalings: Optional[torch.Tensor] = None

    def add_expert(self, name: str, config: LoraConfig, module_name: str) -> int:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.experts.append(name)
        self.expert_scaling[name] = lora_scaling(alpha, r, config.use_rslora)
        p = float(config.lora_dropout)
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        return r

    def expert_tensors(self, name: str) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Checkpoint key suffix (as in the expert's LoRA checkpoint) -> live tensor."""
        raise NotImplementedError

    def _scalings(self, x: torch.Tensor) -> torch.Tensor:
        s = self.xlora_scalings
        if s is None:
            raise RuntimeError(
                "An X-LoRA layer ran outside a call of the X-LoRA model, so no gate scalings were set. Call the model "
                "itself (model(...) or model.generate(...)), not one of its sub-modules."
            )
        if s.shape[:2] != x.shape[:2]:
            raise RuntimeError(
                f"X-LoRA scalings are for (batch, seq) = {tuple(s.shape[:2])} but this layer got input of shape "
                f"{tuple(x.shape)}; X-LoRA supports models whose adapted layers see the (batch, seq) of the input ids."
            )
        return s

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return result + self.mixture(x, self._scalings(x)).to(result.dtype)

    def mixture(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class XLoraLinear(XLoraLayer):
    """Experts on ``nn.Linear`` or GPT-2's ``Conv1D``: lora_A is (r, in), lora_B is (out, r) in both cases."""

    def __init__(self, base_layer: nn.Module, layer_index: int, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer, layer_index)
        w = self.get_base_layer().weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._stack: Optional[tuple] = None

    def add_expert(self, name: str, config: LoraConfig, module_name: str) -> int:
        r = super().add_expert(name, config, module_name)
        w = self.get_base_layer().weight
        dtype = adapter_dtype(w)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=dtype)
        self._stack = None
        return r

    def expert_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def _stacked(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert index (R,) and scaling (R,) of every rank row of the concatenated factors (R = sum of ranks)."""
        if self._stack is None or self._stack[0].device != device:
            ranks = [self.lora_A[n].weight.shape[0] for n in self.experts]
            index = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)).to(device)
            scale = torch.repeat_interleave(torch.tensor([self.expert_scaling[n] for n in self.experts]), torch.tensor(ranks))
            self._stack = (index, scale.to(device))
        return self._stack

    def mixture(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """sum_e s[..., e] * scaling_e * B_e A_e x for x (batch, seq, in) and s (batch, seq, n_experts)."""
        dtype = self.lora_A[self.experts[0]].weight.dtype
        x = x.to(dtype)
        s = s.to(dtype)
        if self.training and any(not isinstance(self.lora_dropout[n], nn.Identity) for n in self.experts):
            out = 0
            for e, n in enumerate(self.experts):  # each expert draws its own dropout mask
                h = self.lora_A[n](self.lora_dropout[n](x)) * s[..., e:e + 1]
                out = out + self.lora_B[n](h) * self.expert_scaling[n]
            return out
        # One matmul pair for all experts: concatenate the A's (sum of ranks x in) and the B's (out x sum of ranks)
        # and weight each rank row by its expert's scaling; a token's mixture is then a diagonal rescale in between.
        a = torch.cat([self.lora_A[n].weight for n in self.experts], dim=0)
        b = torch.cat([self.lora_B[n].weight for n in self.experts], dim=1)
        index, scale = self._stacked(x.device)
        h = F.linear(x, a) * (s[..., index] * scale.to(dtype))
        return F.linear(h, b)


class XLoraEmbedding(XLoraLayer):
    """Experts on ``nn.Embedding``: lora_embedding_A is (r, num_embeddings), lora_embedding_B is (dim, r)."""

    def __init__(self, base_layer: nn.Embedding, layer_index: int) -> None:
        super().__init__(base_layer, layer_index)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_expert(self, name: str, config: LoraConfig, module_name: str) -> int:
        r = super().add_expert(name, config, module_name)
        w = self.get_base_layer().weight
        dtype = adapter_dtype(w)
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, w.shape[0], device=w.device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.zeros(w.shape[1], r, device=w.device, dtype=dtype))
        return r

    def expert_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def mixture(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        out = 0
        for e, n in enumerate(self.experts):
            a, b = self.lora_embedding_A[n], self.lora_embedding_B[n]
            after_a = F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                                  base.sparse)
            out = out + (after_a * s[..., e:e + 1].to(a.dtype)) @ b.t() * self.expert_scaling[n]
        return out


def _create_xlora_layer(target: nn.Module, layer_index: int, module_name: str) -> XLoraLayer:
    base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
    if isinstance(base, nn.Linear):
        return XLoraLinear(target, layer_index, fan_in_fan_out=False)
    if conv1d_cls() and isinstance(base, conv1d_cls()):
        return XLoraLinear(target, layer_index, fan_in_fan_out=True)
    if isinstance(base, nn.Embedding):
        return XLoraEmbedding(target, layer_index)
    raise ValueError(
        f"X-LoRA supports experts on Linear, GPT-2 Conv1D and Embedding layers; {module_name} is a "
        f"{type(base).__name__}. Use experts that do not target it."
    )


def _no_direct_layer(*_: Any, **__: Any) -> None:
    raise TypeError("X-LoRA layers are built by XLoraModel from the experts' LoRA configs, not one module at a time.")


# ------------------------------------------------------------------------------------------------ experts
@dataclass
class _Expert:
    name: str
    path: str
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    targets: list[str]


def _read_expert(name: str, path: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    try:
        config, _, tensors, _ = read_checkpoint(path, parse=PeftConfig.from_file_data)
    except Exception as err:
        raise ValueError(
            f"X-LoRA expert {name!r}: cannot read a LoRA checkpoint at {path!r} ({err}). Each entry of "
            "XLoraConfig.adapters must be a folder (or hub id) with adapter_config.json and adapter_model.safetensors, "
            "as written by save_pretrained of a LoRA model."
        ) from err
    if not isinstance(config, LoraConfig):
        raise ValueError(f"X-LoRA expert {name!r} at {path!r} is a {config.peft_type} adapter; experts must be LoRA.")
    problems = []
    if config.use_dora:
        problems.append("use_dora=True (DoRA experts are not supported)")
    if config.modules_to_save:
        problems.append(f"modules_to_save={config.modules_to_save} (full module copies cannot be mixed per token)")
    if config.bias != "none":
        problems.append(f"bias={config.bias!r} (trained biases cannot be mixed per token)")
    if problems:
        raise ValueError(f"X-LoRA expert {name!r} at {path!r} cannot be used: {'; '.join(problems)}.")
    return config, tensors


class XLoraModel(AdapterModel):
    """The engine for X-LoRA: one X-LoRA adapter holding the experts, the gate and the dual forward pass."""

    def inject_adapter(self, adapter_name: str, config: XLoraConfig, loading: bool = False) -> None:
        if self.peft_config:
            raise ValueError("A model holds one X-LoRA adapter; its experts are listed in XLoraConfig.adapters.")
        experts = self._load_experts(config)
        n_experts = len(experts)
        hidden_size = self._hidden_size(config)
        config.hidden_size = hidden_size
        if config.top_k_lora is not None and config.top_k_lora > n_experts:
            raise ValueError(f"top_k_lora={config.top_k_lora} is larger than the number of experts ({n_experts}).")

        targets = experts[0].targets
        self.peft_config[adapter_name] = config
        self._xlora_layers: list[XLoraLayer] = []
        try:
            for index, module_name in enumerate(targets):
                module = self.model.get_submodule(module_name)
                if isinstance(module, AdapterLayer):
                    raise ValueError(f"{module_name} already holds adapters; X-LoRA needs a model without adapters.")
                layer = _create_xlora_layer(module, index, module_name)
                for ex in experts:
                    layer.add_expert(ex.name, ex.config, module_name)
                layer.adapter_configs[adapter_name] = config
                self._copy_expert_weights(layer, module_name, experts)
                parent, attr = _get_parent(self.model, module_name)
                setattr(parent, attr, layer)
                self._xlora_layers.append(layer)
        except Exception:
            self._discard_partial_adapter(adapter_name)
            raise
        ref = next(self.model.parameters())
        gate = XLoraGate(config, hidden_size, len(targets), n_experts)
        setattr(self, GATE_NAME, gate.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None))
        self.expert_names = [ex.name for ex in experts]
        self._latest_scalings: Optional[torch.Tensor] = None
        self._scalings_log: list[torch.Tensor] = []
        self._log_scalings = False
        self._disable_kv_cache()
        self._hooks = [
            self.model.register_forward_pre_hook(self._before_model_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_model_forward, always_call=True),
        ]
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.active_adapters = [adapter_name]
        self.set_adapter(adapter_name)

    # ---- building
    def _load_experts(self, config: XLoraConfig) -> list[_Expert]:
        experts = []
        for name, path in config.adapters.items():
            path = os.path.expanduser(path)
            if os.path.isdir(path):
                path = os.path.abspath(path)
            elif os.path.exists(path) or path.startswith((".", "/", "~")):
                raise ValueError(
                    f"X-LoRA expert {name!r}: {path!r} is not a folder. Pass the folder written by save_pretrained of "
                    "a LoRA model."
                )
            lora_config, tensors = _read_expert(name, path)
            lora_config = copy.deepcopy(lora_config)
            if isinstance(lora_config.target_modules, str) and lora_config.target_modules.lower() == ALL_LINEAR:
                lora_config.target_modules = expand_all_linear(self.model, lora_config.task_type)
            names = set(find_targets(self.model, lora_config))
            ordered = [n for n, _ in self.model.named_modules() if n in names]  # model order, like PEFT's layer numbers
            experts.append(_Expert(name, path, lora_config, tensors, ordered))
            config.adapters[name] = path
        first = experts[0]
        for ex in experts[1:]:
            if ex.targets != first.targets:
                only_first = sorted(set(first.targets) - set(ex.targets))[:5]
                only_this = sorted(set(ex.targets) - set(first.targets))[:5]
                raise ValueError(
                    f"X-LoRA experts must adapt the same modules, but {first.name!r} and {ex.name!r} differ: only in "
                    f"{first.name!r}: {only_first or 'none'}; only in {ex.name!r}: {only_this or 'none'}. Train the "
                    "experts with the same target_modules (ranks may differ)."
                )
        return experts

    def _hidden_size(self, config: XLoraConfig) -> int:
        model_cfg = getattr(self.model, "config", None)
        found = getattr(model_cfg, "hidden_size", None) or getattr(model_cfg, "n_embd", None) or getattr(model_cfg, "d_model", None)
        if config.hidden_size is None:
            if found is None:
                raise ValueError("Cannot tell the model's hidden size; set XLoraConfig(hidden_size=...).")
            return int(found)
        if found is not None and int(found) != config.hidden_size:
            raise ValueError(
                f"XLoraConfig.hidden_size={config.hidden_size} but the model's hidden size is {found}; the gate reads "
                "the model's last hidden state, so they must match."
            )
        return config.hidden_size

    def _copy_expert_weights(self, layer: XLoraLayer, module_name: str, experts: list[_Expert]) -> None:
        with torch.no_grad():
            for ex in experts:
                for suffix, live in layer.expert_tensors(ex.name).items():
                    key = f"{CHECKPOINT_PREFIX}{module_name}.{suffix}"
                    if key not in ex.tensors:
                        raise ValueError(f"X-LoRA expert {ex.name!r} at {ex.path!r} has no tensor {key}.")
                    value = ex.tensors[key]
                    if tuple(value.shape) != tuple(live.shape):
                        raise ValueError(
                            f"X-LoRA expert {ex.name!r}: checkpoint tensor {key} has shape {tuple(value.shape)}, but "
                            f"its config and the model give {tuple(live.shape)}. Was it trained on another base model?"
                        )
                    live.copy_(value.to(device=live.device, dtype=live.dtype))

    def _disable_kv_cache(self) -> None:
        """The scaling pass reruns the whole sequence, so generation must not use a KV cache (remembered for unload)."""
        self._cache_flags = []
        for holder in (getattr(self.model, "config", None), getattr(self.model, "generation_config", None)):
            if holder is not None and getattr(holder, "use_cache", None):
                self._cache_flags.append(holder)
                holder.use_cache = False

    # ---- the dual forward pass
    @property
    def gate(self) -> XLoraGate:
        return getattr(self, GATE_NAME)

    @property
    def xlora_config(self) -> XLoraConfig:
        return next(iter(self.peft_config.values()))

    def _set_layer_scalings(self, scalings: Optional[torch.Tensor]) -> None:
        for layer in self._xlora_layers:
            layer.xlora_scalings = None if scalings is None else scalings[:, :, layer.layer_index, :]

    def _before_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._xlora_layers or self._xlora_layers[0].adapters_disabled:
            return None
        config = self.xlora_config
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("X-LoRA needs input_ids or inputs_embeds to size its scalings.")
        # transformers >= 5.24 names the cache argument ``cache``; older releases ``past_key_values``.
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0 or kwargs.get("use_cache")):
            raise ValueError(
                "X-LoRA recomputes its gate from the whole sequence at every step and cannot use a KV cache; call "
                "generate(..., use_cache=False) (the default after get_peft_model) and pass no cache / past_key_values."
            )
        if torch.is_grad_enabled() and module.training and _reentrant_checkpointing(module):
            # the scalings reach the layers beside their inputs: reentrant recomputation would backpropagate
            # into the gate once per checkpointed block ("backward through the graph a second time")
            raise ValueError(
                "X-LoRA cannot train with reentrant activation checkpointing (its gate's scalings reach the layers "
                "outside their inputs); enable it with gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        b, s = ref.shape[:2]
        n_layers, n_experts = len(self._xlora_layers), len(self.expert_names)
        dummy = torch.full((b, s, n_layers, n_experts), float(config.scaling_pass_value), device=ref.device,
                           dtype=self.gate.layers[-1].weight.dtype)
        self._set_layer_scalings(effective_scalings(dummy, config))
        pass_kwargs = {k: v for k, v in kwargs.items() if k != "labels" and k not in CACHE_KWARGS}
        pass_kwargs.update(output_hidden_states=True, return_dict=True, use_cache=False)
        with torch.no_grad():
            out = module.forward(*args, **pass_kwargs)  # .forward: the hooks do not run again
        hidden = getattr(out, "hidden_states", None)
        if not hidden:
            raise ValueError(f"{type(module).__name__} returned no hidden_states; X-LoRA needs a transformers model "
                             "that supports output_hidden_states=True.")
        last = hidden[-1]
        if last.shape[-1] != config.hidden_size:
            raise ValueError(f"The model's last hidden state has size {last.shape[-1]}, XLoraConfig.hidden_size is "
                             f"{config.hidden_size}.")
        gate_w = self.gate.layers[-1].weight
        scalings = gate_scalings(self.gate(last.to(gate_w.dtype)), n_layers, n_experts, config)
        self._latest_scalings = scalings
        if self._log_scalings:
            self._scalings_log.append(scalings.detach())
        self._set_layer_scalings(effective_scalings(scalings, config))
        return None

    def _after_model_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        # After a call that may be followed by backward, the layers keep their scalings until the next call
        # replaces them: activation checkpointing reruns the layers' forward during backward and needs them.
        if not torch.is_grad_enabled():
            self._set_layer_scalings(None)
        return None

    # ---- inspection and settings (names as in Hugging Face PEFT)
    def get_latest_scalings(self) -> Optional[torch.Tensor]:
        """The gate's scalings of the last call, (batch, seq, n_layers, n_experts), before top-k; None before any."""
        return self._latest_scalings

    def enable_scalings_logging(self) -> None:
        """Append (detached) scalings of every call to the log."""
        self._log_scalings = True

    def disable_scalings_logging(self) -> None:
        """Stop logging; the log is kept."""
        self._log_scalings = False

    def clear_scalings_log(self) -> None:
        self._scalings_log.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the log (the list, not the tensors); each entry is (batch, seq, n_layers, n_experts)."""
        return list(self._scalings_log)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: seq_len -> (positions in the log, scalings)."""
        out: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, s in enumerate(self._scalings_log):
            pos, items = out.setdefault(s.shape[1], ([], []))
            pos.append(i)
            items.append(s)
        return out

    def set_topk_lora(self, value: Optional[int]) -> None:
        if value is not None and not 1 <= value <= len(self.expert_names):
            raise ValueError(f"top_k_lora must be between 1 and {len(self.expert_names)} or None, got {value!r}.")
        self.xlora_config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        self.xlora_config.global_scaling_weight = weight

    def get_global_scaling_weight(self) -> float:
        return self.xlora_config.global_scaling_weight

    def set_scaling_pass_value(self, value: Optional[float]) -> None:
        """Weight of every expert in the scaling pass; None means 1 / n_experts."""
        self.xlora_config.scaling_pass_value = 1 / len(self.expert_names) if value is None else value

    # ---- engine hooks
    def engine_adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        # The gate lives on the engine, so its keys are PEFT's: base_model.internal_xlora_classifier.layers.<i>.*
        return {f"base_model.{GATE_NAME}.{k}": p for k, p in self.gate.named_parameters()}

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        config = self.xlora_config
        self.gate.requires_grad_(not config.inference_mode)
        train_experts = config.use_trainable_adapters and not config.inference_mode
        for layer in self._xlora_layers:
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer."):
                    p.requires_grad_(train_experts)

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError("An X-LoRA model has a single adapter; use unload() to get the base model back.")

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        if merge:
            raise ValueError("X-LoRA mixes its experts per token, so it cannot be merged into the base weights; use unload().")
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        for holder in getattr(self, "_cache_flags", []):
            holder.use_cache = True
        self._cache_flags = []
        return super()._unwrap(merge=False)


XLORA = register_method(
    MethodSpec(
        peft_type=PeftType.XLORA.value,
        config_cls=XLoraConfig,
        create_layer=_no_direct_layer,
        prefix=GATE_NAME,
        model_cls=XLoraModel,
        supports_mixed_batch=False,
        supports_merge=False,
    )
)
