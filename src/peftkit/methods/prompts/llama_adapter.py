"""Llama-Adapter (Zhang et al., 2023): adaption prompts attended to by the top layers' attention, behind zero-init gates.

In each of the top ``adapter_layers`` attention modules, ``adapter_len`` trained prompt vectors (hidden size each) are
projected by the module's own key and value projections; the module's queries (with their rotary embedding) attend
to them in a separate softmax, which is multiplied by a learned gate (initialised to 0, so the model is unchanged at
init) and projected by the output projection; the result is added to the attention's output. The prompts carry no
position (no rotary embedding) and every query sees them (no mask), so generation with or without a KV cache, and
with left padding, needs nothing special.

Supported attention modules: Llama-style ones (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and the
``position_embeddings`` argument: Llama, Mistral, Qwen2, ...; grouped-query attention included) and GPT-2's (``c_attn``
/ ``c_proj``; as in Hugging Face PEFT, the adapter's output is added after ``c_proj`` without passing through it).
``AdaptionPromptConfig`` and the checkpoint keys (``<attention>.adaption_prompt`` of shape (1, adapter_len, hidden)
and ``<attention>.adaption_gate`` of shape (1,)) follow PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.config import PeftConfig, PeftType
from peftkit.engine.layer import AdapterLayer
from peftkit.engine.registry import MethodSpec, register_method
from peftkit.engine.tuner import AdapterModel, _check_adapter_name, _get_parent
from peftkit.methods.common import adapter_dtype
from peftkit.integrations import quantization as _quant

LLAMA, GPT2 = "llama", "gpt2"


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Configuration of Llama-Adapter (PEFT's names): ``adapter_len`` prompt vectors in each of the top
    ``adapter_layers`` attention modules named ``target_modules`` (default ``self_attn``, or ``attn`` for GPT-2)."""

    target_modules: Optional[str] = field(default=None, metadata={"help": "Name of the attention modules."})
    adapter_len: int = field(default=None, metadata={"help": "Number of adaption prompt vectors per layer."})
    adapter_layers: int = field(default=None, metadata={"help": "Number of adapted layers, counted from the top."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules (e.g. a classifier head) trained in full and saved with the adapter."}
    )

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADAPTION_PROMPT
        super().__post_init__()
        for name in ("adapter_len", "adapter_layers"):
            v = getattr(self, name)
            if v is None or isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AdaptionPromptConfig.{name} must be a positive integer, got {v!r}.")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(f"AdaptionPromptConfig.target_modules is one module name (e.g. 'self_attn'), got {self.target_modules!r}.")


    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("modules_to_save") is None:  # PEFT's AdaptionPromptConfig has no such field: keep its files clean
            out.pop("modules_to_save", None)
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_family(module: nn.Module) -> Optional[str]:
    if all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(module, "config"):
        return LLAMA
    if all(hasattr(module, n) for n in ("c_attn", "c_proj", "head_dim", "num_heads", "split_size")):
        return GPT2
    return None


class AdaptedAttention(AdapterLayer):
    """An attention module plus adaption prompts (one adapter active at a time)."""

    adapter_slots = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module, family: str) -> None:
        super().__init__(base_layer)
        self.family = family
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def _proj(self) -> nn.Module:
        base = self.get_base_layer()
        return base.q_proj if self.family == LLAMA else base.c_attn

    def update_layer(self, adapter_name: str, config: AdaptionPromptConfig, **kwargs: Any) -> None:
        base = self.get_base_layer()
        hidden = base.config.hidden_size if self.family == LLAMA else base.embed_dim
        w = self._proj().weight
        dtype = adapter_dtype(w)  # float32 over a half-precision base (PEFT keeps the base's dtype)
        self.adaption_prompt[adapter_name] = nn.Parameter(
            torch.empty(1, config.adapter_len, hidden, device=w.device, dtype=dtype).normal_())
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=w.device, dtype=dtype))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        names = [n for n in self.active_adapters if n in self.adapter_configs]
        if self.adapters_disabled or not names:
            return out
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn = out[0] if isinstance(out, tuple) else out
        for name in names:
            attn = attn + self.adaption(name, hidden, kwargs).to(attn.dtype)
        return (attn, *out[1:]) if isinstance(out, tuple) else attn

    def adaption(self, name: str, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The gated attention of the queries of ``hidden`` to the adaption prompt: (batch, seq, hidden)."""
        base = self.get_base_layer()
        prompt = self.adaption_prompt[name]
        gate = self.adaption_gate[name]
        b, q_len, _ = hidden.shape
        length = prompt.shape[1]
        if self.family == LLAMA:
            heads = base.config.num_attention_heads
            head_dim = getattr(base, "head_dim", None) or base.config.hidden_size // heads
            kv_heads = getattr(base.config, "num_key_value_heads", None) or heads
            q = base.q_proj(hidden).view(b, q_len, heads, head_dim).transpose(1, 2)
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise ValueError(
                    f"Llama-Adapter applies the rotary embedding to the queries and needs the `position_embeddings` "
                    f"argument that {type(base).__name__} did not receive; this transformers version is not supported."
                )
            cos, sin = (t.unsqueeze(1) for t in pe)
            q = q * cos + _rotate_half(q) * sin
            p = prompt.to(q.dtype)
            k = base.k_proj(p).view(1, length, kv_heads, head_dim).transpose(1, 2)
            v = base.v_proj(p).view(1, length, kv_heads, head_dim).transpose(1, 2)
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        else:
            heads, head_dim = base.num_heads, base.head_dim
            q = base.c_attn(hidden).split(base.split_size, dim=2)[0]
            q = q.view(b, q_len, heads, head_dim).transpose(1, 2)
            _, k, v = base.c_attn(prompt.to(q.dtype)).split(base.split_size, dim=2)
            k = k.view(1, length, heads, head_dim).transpose(1, 2)
            v = v.view(1, length, heads, head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3).to(q.dtype)) / math.sqrt(head_dim)
        weights = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v.to(weights.dtype)).transpose(1, 2).reshape(b, q_len, heads * head_dim)
        if self.family == LLAMA:
            out = base.o_proj(out.to(_quant.input_dtype(base.o_proj, out.dtype)))  # a quantised o_proj: activations' dtype
        return out


class AdaptionPromptModel(AdapterModel):
    """Engine for Llama-Adapter: wraps the top ``adapter_layers`` attention modules; one adapter active at a time."""

    def _targets(self, config: AdaptionPromptConfig) -> list[str]:
        names = [n for n, _ in self.model.named_modules()]
        if config.target_modules is None:
            for default in ("self_attn", "attn"):
                if any(n.endswith("." + default) for n in names):
                    config.target_modules = default
                    break
        found = [n for n in names if config.target_modules and n.endswith("." + config.target_modules)]
        cls = type(self.model).__name__
        if not found:
            raise ValueError(
                f"Llama-Adapter found no attention module named {config.target_modules or 'self_attn / attn'!r} in "
                f"{cls}; set target_modules to the name of its attention modules."
            )
        if len(found) < config.adapter_layers:
            raise ValueError(f"adapter_layers={config.adapter_layers} but {cls} has only {len(found)} attention modules.")
        found = found[-config.adapter_layers:]
        for n in found:
            module = self.model.get_submodule(n)
            base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
            if attention_family(base) is None:
                raise ValueError(
                    f"Llama-Adapter cannot adapt {n} ({type(base).__name__}) of {cls}: it needs Llama-style "
                    "q_proj/k_proj/v_proj/o_proj projections with a config, or GPT-2's c_attn/c_proj."
                )
        return found

    def inject_adapter(self, adapter_name: str, config: AdaptionPromptConfig, loading: bool = False) -> None:
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name or delete it first.")
        if not isinstance(config, AdaptionPromptConfig):
            raise ValueError(f"{type(config).__name__} cannot be added to a Llama-Adapter model.")
        targets = self._targets(config)
        first_adapter = not self.peft_config
        self.peft_config[adapter_name] = config
        try:
            for name in targets:
                module = self.model.get_submodule(name)
                if not isinstance(module, AdaptedAttention):
                    module = AdaptedAttention(module, attention_family(module))
                    parent, attr = _get_parent(self.model, name)
                    setattr(parent, attr, module)
                module.update_layer(adapter_name, config)
                module.adapter_configs[adapter_name] = config
            self._add_modules_to_save(adapter_name, config)
        except Exception:
            self._discard_partial_adapter(adapter_name)
            raise
        if first_adapter:
            self._freeze_base()
            self.active_adapters = [adapter_name]
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError(f"Llama-Adapter adapters cannot be combined: activate exactly one (got {names}).")
        super().set_adapter(names, inference_mode=inference_mode)


ADAPTION_PROMPT = register_method(
    MethodSpec(
        peft_type=PeftType.ADAPTION_PROMPT.value,
        config_cls=AdaptionPromptConfig,
        create_layer=lambda *a, **k: None,  # AdaptionPromptModel creates its layers
        prefix="adaption_",
        model_cls=AdaptionPromptModel,
        supports_mixed_batch=False,
        supports_merge=False,
    )
)
