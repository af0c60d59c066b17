"""Hybrids: one named adapter made of several component methods on one model (MAM adapters, UniPELT).

A :class:`HybridConfig` says which components it is made of:

* ``layer_components()``: configs of layer-hosted methods (LoRA, bottleneck adapters, ...). Each is injected by its
  own method's factory, under the hybrid's adapter name, exactly as that method's engine would inject it (the
  component method's ``_resolve_targets`` picks the targets), so the layers, their parameters and their checkpoint
  keys are the component method's own;
* ``prefix_component()``: an optional AdapterHub-style key/value prefix (:class:`PrefixSpec`), put into the model's
  calls by :func:`~peftkit.engine.prompting.add_prefix_to_call` (the prompt-learning engine's cache mechanism), with
  AdapterHub's optional per-layer gate.

:class:`HybridModel` is the engine: a plain :class:`~peftkit.engine.tuner.AdapterModel` (named adapters, set/delete,
disable, save/load in PEFT's key layout) that also holds the prefix modules (``prefix_tuning.<adapter>``, saved as
``base_model.prefix_tuning.*``) and the prefix gates (``prefix_gates.<adapter>.<layer>``).

Prefix gate (AdapterHub's ``use_gating`` on prefix tuning): ``g = mean_seq(sigmoid(Linear(hidden, 1)(x)))`` with
``x`` the input of the layer's self-attention; the layer's prefix keys and values are multiplied by ``g`` (one scalar
per example). It is applied by a forward pre-hook on each self-attention module that hands the attention a view of
the cache whose ``update()`` scales the first ``prefix_length`` positions; nothing is stored between calls.

Encoder-decoder models (T5; AdapterHub's placement): one prefix module per location, ``encoder_prefix`` (encoder
self-attention), ``self_prefix`` (decoder self-attention) and ``cross_prefix`` (cross-attention), held in a
:class:`HybridPrefixGroup`; gates, when used, one per attention. A forward pre-hook on each attention module computes
that layer's prefix (only its rows of the MLP's last Linear), gates it with that attention's input, hands the attention
a :class:`_PrefixedCache` (``update()`` stores the real keys/values in the real cache, if any, and returns them after
the prefix, which is never stored) and extends its mask over the prefix (an explicit causal mask where SDPA would
otherwise align ``is_causal`` top-left). T5's relative position bias is then computed over prefix + keys, so the real
keys sit at positions P, P + 1, ... as in AdapterHub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from peftkit.engine.config import PeftConfig
from peftkit.engine.layer import AdapterLayer
from peftkit.engine.registry import method_for_config
from peftkit.engine.targeting import find_targets
from peftkit.engine.tuner import AdapterModel, _check_adapter_name, _get_parent


@dataclass
class PrefixSpec:
    """An AdapterHub prefix: ``wte`` = Embedding(prefix_length, hidden); ``control_trans`` = Linear(hidden,
    bottleneck_size), tanh, Linear(bottleneck_size, layers * 2 * kv_heads * head_dim)."""

    prefix_length: int
    bottleneck_size: int
    use_gating: bool = False
    dropout: float = 0.0


@dataclass
class HybridConfig(PeftConfig):
    """Base of configs that compose several methods into one adapter."""

    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules (e.g. a classifier head) trained in full and saved with the adapter."})

    def layer_components(self) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prefix_component(self) -> Optional[PrefixSpec]:
        return None

    @classmethod
    def from_adapterhub(cls, configs: list[dict[str, Any]]) -> Optional["HybridConfig"]:
        """This hybrid for AdapterHub's ``union`` config ``configs`` (its components' dicts), or None if the
        union is not this hybrid. Raises, naming the field, when it is this hybrid with a setting peftkit lacks."""
        return None

    def adapterhub_dict(self) -> dict[str, Any]:
        """The ``config`` dict AdapterHub writes for this adapter (a ``union`` of its components' dicts)."""
        parts = [adapterhub_prefix_dict(self.prefix_component())] if self.prefix_component() else []
        for comp in self.layer_components():
            parts.append(comp.adapterhub_dict() if hasattr(comp, "adapterhub_dict") else self.adapterhub_component(comp))
        return parts[0] if len(parts) == 1 else {"architecture": "union", "configs": parts}

    def adapterhub_component(self, comp: Any) -> dict[str, Any]:
        raise ValueError(f"{type(self).__name__} cannot describe its {type(comp).__name__} component to AdapterHub.")


def adapterhub_prefix_dict(spec: PrefixSpec) -> dict[str, Any]:
    """AdapterHub's ``PrefixTuningConfig`` dict for the prefix ``spec``."""
    return {"architecture": "prefix_tuning", "bottleneck_size": spec.bottleneck_size, "cross_prefix": True,
            "dropout": spec.dropout, "encoder_prefix": True, "flat": False, "init_weights_seed": None, "leave_out": [],
            "non_linearity": "tanh", "prefix_length": spec.prefix_length, "shared_gating": True,
            "use_gating": spec.use_gating}


def check_adapterhub_component(name: str, theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    """Every setting of an AdapterHub component dict that peftkit's component also has must be equal."""
    for key, value in ours.items():
        if key in theirs and theirs[key] != value and not (isinstance(value, float) and theirs[key] == value):
            raise ValueError(f"This AdapterHub {name} component has {key}={theirs[key]!r}; peftkit's hybrid supports "
                             f"only {value!r} there.")


class HybridPrefix(nn.Module):
    """One adapter's prefixes for every layer (AdapterHub's module names, so its checkpoints map one-to-one)."""

    def __init__(self, spec: PrefixSpec, hidden: int, layers: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.wte = nn.Embedding(spec.prefix_length, hidden)
        self.control_trans = nn.Sequential(nn.Linear(hidden, spec.bottleneck_size), nn.Tanh(),
                                           nn.Linear(spec.bottleneck_size, layers * 2 * kv_heads * head_dim))
        self.dropout = nn.Dropout(spec.dropout)

    def keys_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each (batch, kv_heads, prefix_length, head_dim)."""
        n = self.wte.num_embeddings
        out = self.dropout(self.control_trans(self.wte.weight)).to(dtype)  # (n, layers * 2 * heads * dim)
        kv = out.view(n, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        return [(kv[i, 0].unsqueeze(0).expand(batch, -1, -1, -1), kv[i, 1].unsqueeze(0).expand(batch, -1, -1, -1))
                for i in range(self.layers)]

    def layer_keys_values(self, i: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s (key, value), each (batch, kv_heads, prefix_length, head_dim): the same numbers as
        ``keys_values()[i]``, computing only that layer's rows of the last Linear (for one attention call)."""
        n, width = self.wte.num_embeddings, 2 * self.kv_heads * self.head_dim
        first, last = self.control_trans[0], self.control_trans[2]
        hidden = self.control_trans[1](first(self.wte.weight))
        rows = slice(i * width, (i + 1) * width)
        out = self.dropout(nn.functional.linear(hidden, last.weight[rows], last.bias[rows])).to(dtype)
        kv = out.view(n, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0].unsqueeze(0).expand(batch, -1, -1, -1), kv[1].unsqueeze(0).expand(batch, -1, -1, -1)


class HybridPrefixGroup(nn.ModuleDict):
    """An encoder-decoder model's prefixes, one :class:`HybridPrefix` per location, under AdapterHub's location
    names: ``encoder_prefix`` (encoder self-attention), ``self_prefix`` (decoder self-attention), ``cross_prefix``
    (decoder cross-attention)."""

    @property
    def wte(self) -> nn.Embedding:  # the prefix length and parameter dtype, as on HybridPrefix
        return next(iter(self.values())).wte


ENCODER_PREFIX, SELF_PREFIX, CROSS_PREFIX = "encoder_prefix", "self_prefix", "cross_prefix"
_CROSS_NAMES = ("EncDecAttention", "encoder_attn", "crossattention", "cross_attn")


def seq2seq_prefix_sites(model: nn.Module) -> list[tuple[str, nn.Module, str, int]]:
    """(path, attention module, location, layer index within the location) of every attention of an encoder-decoder
    model where AdapterHub puts a prefix: the modules taking ``key_value_states`` and a cache argument, in the
    encoder (``encoder_prefix``) and the decoder (``self_prefix``; ``cross_prefix`` for the cross-attention)."""
    from peftkit.engine.prompting import CACHE_KWARGS, forward_parameters

    found: list[tuple[str, nn.Module, str, int]] = []
    counts: dict[str, int] = {}
    candidates = []
    for path, m in model.named_modules():
        params = forward_parameters(m)
        if "key_value_states" in params and any(k in params for k in CACHE_KWARGS):
            candidates.append((path, m))
    paths = [p for p, _ in candidates]
    for path, m in candidates:
        if any(other.startswith(path + ".") for other in paths):
            continue  # a wrapper of the attention (T5LayerCrossAttention): the innermost module is the attention
        parts = path.split(".")
        if "encoder" in parts:
            where = ENCODER_PREFIX
        elif "decoder" in parts:
            where = CROSS_PREFIX if parts[-1] in _CROSS_NAMES or getattr(m, "is_cross_attention", False) else SELF_PREFIX
        else:
            continue
        found.append((path, m, where, counts.get(where, 0)))
        counts[where] = counts.get(where, 0) + 1
    return found


class _PrefixedCache:
    """What one attention call of an encoder-decoder model sees as its cache (AdapterHub's placement): ``update()``
    stores the new keys/values in the real cache (if any) as the model would, and returns them after the prefix.
    The prefix itself is never stored, so each call (and a recomputation under checkpointing) adds it afresh."""

    def __init__(self, inner: Any, key: torch.Tensor, value: torch.Tensor, cross: bool) -> None:
        self._inner, self._key, self._value, self._cross = inner, key, value, cross

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self._inner is None else self._inner.get_seq_length(layer_idx)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        from transformers import EncoderDecoderCache

        inner = self._inner
        if inner is None:
            k, v = key, value
        elif isinstance(inner, EncoderDecoderCache) and self._cross:
            if inner.is_updated.get(layer_idx):  # later steps: the encoder's keys/values are cached already
                k, v = inner.cross_attention_cache.layers[layer_idx].keys, inner.cross_attention_cache.layers[layer_idx].values
            else:
                k, v = inner.cross_attention_cache.update(key, value, layer_idx, *args, **kwargs)
                inner.is_updated[layer_idx] = True
        else:
            sub = inner.self_attention_cache if isinstance(inner, EncoderDecoderCache) else inner
            k, v = sub.update(key, value, layer_idx, *args, **kwargs)
        return (torch.cat([self._key.to(k.dtype), k], dim=2), torch.cat([self._value.to(v.dtype), v], dim=2))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class _GatedCache:
    """A view of a KV cache for one attention call: ``update`` returns the keys/values with the first ``n``
    positions (the prefix) multiplied by ``gate`` (batch, 1, 1, 1). Everything else goes to the real cache."""

    def __init__(self, cache: Any, gate: torch.Tensor, n: int) -> None:
        self._cache, self._gate, self._n = cache, gate, n

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        k, v = self._cache.update(key, value, *args, **kwargs)
        n, g = self._n, self._gate.to(k.dtype)
        return torch.cat([k[:, :, :n] * g, k[:, :, n:]], 2), torch.cat([v[:, :, :n] * g, v[:, :, n:]], 2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers model, in layer order (those with a ``layer_idx`` that take a
    cache argument; cross-attention excluded)."""
    from peftkit.engine.prompting import CACHE_KWARGS, forward_parameters

    found = []
    for name, m in model.named_modules():
        if not isinstance(getattr(m, "layer_idx", None), int):
            continue
        if "cross" in type(m).__name__.lower() or getattr(m, "is_cross_attention", False):
            continue
        if "attention" not in type(m).__name__.lower() and "attn" not in type(m).__name__.lower():
            continue
        if any(k in forward_parameters(m) for k in CACHE_KWARGS):
            found.append(m)
    return found


def _prefix_gates(n: int, hidden: int) -> nn.ModuleList:
    """One gate per prefixed attention: a linear hidden -> 1, weight N(0, 0.02) as AdapterHub, PyTorch's default bias."""
    gates = nn.ModuleList()
    for _ in range(n):
        gate = nn.Linear(hidden, 1)
        nn.init.normal_(gate.weight, std=0.02)
        gates.append(gate)
    return gates


class HybridModel(AdapterModel):
    """The engine of hybrid methods (see the module docstring)."""

    def __init__(self, model: nn.Module, config: HybridConfig, adapter_name: str = "default", loading: bool = False):
        nn.Module.__init__(self)
        self.model = model
        self.peft_config: dict[str, HybridConfig] = {}
        self.active_adapters: list[str] = []
        self.prefix_tuning = nn.ModuleDict()
        self.prefix_gates = nn.ModuleDict()
        self.prefixes_disabled = False
        self._hooks: list[Any] = []
        self._cache_readers: list[nn.Module] = []
        self.inject_adapter(adapter_name, config, loading=loading)

    # ------------------------------------------------------------------------------------------ injection
    def inject_adapter(self, adapter_name: str, config: HybridConfig, loading: bool = False) -> None:
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name or delete it first.")
        if not isinstance(config, HybridConfig):
            raise ValueError(f"{type(config).__name__} is not a hybrid config and cannot be added to this model.")
        first_adapter = not self.peft_config
        self.peft_config[adapter_name] = config
        try:
            for comp in config.layer_components():
                self._inject_component(adapter_name, comp, loading)
            spec = config.prefix_component()
            if spec is not None:
                self._add_prefix(adapter_name, spec)
            self._add_modules_to_save(adapter_name, config)
        except Exception:
            self._discard_partial_adapter(adapter_name)
            raise
        if first_adapter:
            self._freeze_base()
            self.active_adapters = [adapter_name]
        self.set_adapter(self.active_adapters)

    def _inject_component(self, adapter_name: str, comp: Any, loading: bool) -> None:
        """Inject one layer-hosted component as its own method's engine would."""
        spec = method_for_config(comp)
        resolve = getattr(spec.model_cls or AdapterModel, "_resolve_targets")
        comp = resolve(self, comp, spec)
        wrapped = 0
        for name in find_targets(self.model, comp):
            module = self.model.get_submodule(name)
            if isinstance(module, AdapterLayer):
                if spec.create_layer is not getattr(module, "_created_by", None):
                    raise ValueError(f"{name} is already wrapped by another component; components must target "
                                     "different modules.")
                module.update_layer(adapter_name, comp, module_name=name, loading=loading)
            else:
                module = spec.create_layer(module, adapter_name, comp, module_name=name, loading=loading)
                if module is None:
                    continue
                module._created_by = spec.create_layer
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, module)
            module.adapter_configs[adapter_name] = comp
            wrapped += 1
        if wrapped == 0:
            raise ValueError(f"The {type(comp).__name__} component found no module to adapt in "
                             f"{type(self.model).__name__}.")

    def _add_prefix(self, adapter_name: str, spec: PrefixSpec) -> None:
        from peftkit.engine.prompting import (cache_argument, is_encoder_decoder, keep_cache_under_checkpointing,
                                              model_dims)

        cls = type(self.model).__name__
        if cache_argument(self.model) is None:
            raise ValueError(f"The prefix of this hybrid goes through the model's cache, but {cls}.forward takes "
                             "neither `cache` nor `past_key_values`; this architecture is not supported.")
        if is_encoder_decoder(self.model):
            self._add_seq2seq_prefix(adapter_name, spec)
            return
        dims = model_dims(self.model, type(self.peft_config[adapter_name]).__name__)
        if not (dims["num_layers"] and dims["hidden"] and dims["heads"]):
            raise ValueError(f"Could not read the number of layers, hidden size and heads of {cls} from its config.")
        head_dim = dims["head_dim"] or dims["hidden"] // dims["heads"]
        kv_heads = dims["kv_heads"] or dims["heads"]
        ref = next(self.model.parameters())
        module = HybridPrefix(spec, dims["hidden"], dims["num_layers"], kv_heads, head_dim)
        self.prefix_tuning[adapter_name] = module.to(ref.device)
        if spec.use_gating:
            attns = self_attention_modules(self.model)
            if len(attns) != dims["num_layers"]:
                raise ValueError(f"The prefix gates need the {dims['num_layers']} self-attention modules of {cls} "
                                 f"(modules with a layer_idx taking a cache argument); found {len(attns)}.")
            self.prefix_gates[adapter_name] = _prefix_gates(len(attns), dims["hidden"]).to(ref.device)
        if not self._hooks:
            self._cache_name = cache_argument(self.model)
            from peftkit.engine.prompting import forward_parameters

            self._takes_position_ids = "position_ids" in forward_parameters(self.model)
            self._hooks.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
            for i, attn in enumerate(self_attention_modules(self.model)):
                self._hooks.append(attn.register_forward_pre_hook(self._gate_hook(i), with_kwargs=True))
            self._cache_readers = keep_cache_under_checkpointing(self.model)

    def _add_seq2seq_prefix(self, adapter_name: str, spec: PrefixSpec) -> None:
        """AdapterHub's placement on encoder-decoder models: a prefix in every encoder self-attention, decoder
        self-attention and cross-attention (three prefix modules), each attention with its own gate when gated. A
        forward pre-hook on each attention hands it a :class:`_PrefixedCache` and a mask extended over the prefix."""
        from peftkit.engine.prompting import model_dims

        cls = type(self.model).__name__
        dims = model_dims(self.model, type(self.peft_config[adapter_name]).__name__)
        sites = seq2seq_prefix_sites(self.model)
        counts = {where: sum(1 for s in sites if s[2] == where) for where in (ENCODER_PREFIX, SELF_PREFIX, CROSS_PREFIX)}
        if not (dims["hidden"] and dims["heads"]) or not all(counts.values()):
            raise ValueError(f"The hybrids' prefix on {cls} needs its hidden size and heads (config) and attention "
                             "modules taking `key_value_states` and a cache in its encoder and decoder (self- and "
                             f"cross-attention); found {counts}. This architecture is not supported.")
        head_dim = dims["head_dim"] or dims["hidden"] // dims["heads"]
        kv_heads = dims["kv_heads"] or dims["heads"]
        ref = next(self.model.parameters())
        group = HybridPrefixGroup({where: HybridPrefix(spec, dims["hidden"], n, kv_heads, head_dim)
                                   for where, n in counts.items()})
        self.prefix_tuning[adapter_name] = group.to(ref.device)
        if spec.use_gating:
            self.prefix_gates[adapter_name] = _prefix_gates(len(sites), dims["hidden"]).to(ref.device)
        if not self._hooks:
            from peftkit.engine.prompting import CACHE_KWARGS, forward_parameters

            for i, (_, attn, where, layer) in enumerate(sites):
                params = forward_parameters(attn)
                names = (next(k for k in CACHE_KWARGS if k in params), "mask" if "mask" in params else "attention_mask")
                self._hooks.append(attn.register_forward_pre_hook(self._seq2seq_hook(i, where, layer, names),
                                                                  with_kwargs=True))

    def _seq2seq_hook(self, site: int, where: str, layer: int, names: tuple[str, str]):
        cache_name, mask_name = names

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple]:
            name = self._active_prefix()
            if name is None:
                return None
            x = args[0] if args else kwargs.get("hidden_states")
            prefix = self.prefix_tuning[name][where]
            key, value = prefix.layer_keys_values(layer, x.shape[0], x.dtype)
            if name in self.prefix_gates:
                gate = self.prefix_gates[name][site]
                g = torch.sigmoid(gate(x.to(gate.weight.dtype))).mean(dim=1).view(-1, 1, 1, 1).to(key.dtype)
                key, value = key * g, value * g
            kwargs = dict(kwargs)
            inner = kwargs.get(cache_name)
            n, mask = key.shape[2], kwargs.get(mask_name)
            if mask is not None:
                if not isinstance(mask, torch.Tensor):
                    raise ValueError(f"The hybrids' prefix on {type(self.model).__name__} needs tensor attention "
                                     f"masks; {type(mask).__name__} (attention implementation "
                                     f"{getattr(self.model.config, '_attn_implementation', '?')!r}) is not supported; "
                                     "use 'eager' or 'sdpa'.")
                fill = True if mask.dtype == torch.bool else 0
                kwargs[mask_name] = torch.cat([torch.full((*mask.shape[:-1], n), fill, dtype=mask.dtype,
                                                          device=mask.device), mask], dim=-1)
            elif where == SELF_PREFIX and getattr(module, "is_causal", False):
                # no mask means "causal" to SDPA, aligned top-left: with the prefix in front the mask must be explicit
                past = 0 if inner is None else int(inner.get_seq_length(getattr(module, "layer_idx", 0) or 0))
                q = x.shape[1]
                allowed = torch.arange(past + q, device=x.device)[None, :] <= past + torch.arange(q, device=x.device)[:, None]
                allowed = torch.cat([torch.ones(q, n, dtype=torch.bool, device=x.device), allowed], dim=1)
                kwargs[mask_name] = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                    ~allowed, torch.finfo(x.dtype).min)[None, None]
            kwargs[cache_name] = _PrefixedCache(inner, key, value, cross=where == CROSS_PREFIX)
            return args, kwargs

        return hook

    def _discard_partial_adapter(self, adapter_name: str) -> None:
        for d in (self.prefix_tuning, self.prefix_gates):
            if adapter_name in d:
                del d[adapter_name]
        # components nest (a LoRA layer inside a block-wrapping adapter layer): take out the inner layers first
        for name, layer in reversed(list(self.adapter_layers())):
            if adapter_name in layer.adapter_configs or any(adapter_name in getattr(layer, s) for s in layer.adapter_slots):
                layer.delete_adapter(adapter_name)
            if not layer.adapter_configs:
                if hasattr(layer, "on_unwrap"):
                    layer.on_unwrap()
                parent, attr = _get_parent(self.model, name)
                setattr(parent, attr, layer.base_layer)
        super()._discard_partial_adapter(adapter_name)
        if not self.peft_config:
            self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for module in self._cache_readers:
            vars(module).pop("_can_checkpoint_with_cache", None)
        self._cache_readers = []

    # ------------------------------------------------------------------------------------------ the prefix
    def _active_prefix(self) -> Optional[str]:
        if self.prefixes_disabled or not self.active_adapters:
            return None
        name = self.active_adapters[0]
        return name if name in self.prefix_tuning else None

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple]:
        from peftkit.engine.prompting import (PromptLearningModel, _cache_of, _input_length, add_prefix_to_call,
                                              cached_length, is_encoder_decoder)

        name = self._active_prefix()
        if name is None:
            return None
        prefix = self.prefix_tuning[name]
        kwargs = PromptLearningModel._named(module, args, kwargs)
        emb = prefix.wte.weight
        model_param = next(module.parameters())
        dtype = model_param.dtype if model_param.is_floating_point() else emb.dtype
        n = prefix.wte.num_embeddings
        given = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        past = cached_length(_cache_of(kwargs))
        add_prefix_to_call(module, kwargs, n, lambda batch, _encdec: prefix.keys_values(batch, dtype),
                           cache_name=self._cache_name)
        # AdapterHub's positions: the real tokens keep theirs (0, 1, ...), the prefix has none; without explicit
        # position ids the model would count the cached prefix as n earlier tokens
        if given is not None:
            kwargs["position_ids"] = given
        elif self._takes_position_ids and not is_encoder_decoder(module):
            length = _input_length(kwargs, decoder=False)
            if length is not None:
                start = max(past - n, 0)
                if mask is not None and mask.dim() == 2 and mask.shape[1] == start + length:
                    # left padding: count only the real tokens (what generate() does for models that take positions)
                    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
                else:
                    ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
                    kwargs["position_ids"] = torch.arange(start, start + length, device=ref.device).unsqueeze(0).expand(
                        ref.shape[0], -1)
        return (), kwargs

    def _gate_hook(self, layer: int):
        from peftkit.engine.prompting import CACHE_KWARGS

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple]:
            name = self._active_prefix()
            if name is None or name not in self.prefix_gates:
                return None
            x = args[0] if args else kwargs.get("hidden_states")
            key = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
            if x is None or key is None:
                return None
            gate = self.prefix_gates[name][layer]
            g = torch.sigmoid(gate(x.to(gate.weight.dtype))).mean(dim=1)  # (batch, 1)
            kwargs = dict(kwargs)
            kwargs[key] = _GatedCache(kwargs[key], g.view(-1, 1, 1, 1), self.prefix_tuning[name].wte.num_embeddings)
            return args, kwargs

        return hook

    # ------------------------------------------------------------------------------------------ management
    def set_adapter(self, adapter_names: Any) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError(f"Hybrid adapters cannot be combined: activate exactly one (got {names}).")
        super().set_adapter(names)
        for d in (self.prefix_tuning, self.prefix_gates):
            for n, module in d.items():
                module.requires_grad_(n == names[0] and not self.peft_config[n].inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for d in (self.prefix_tuning, self.prefix_gates):
            if adapter_name in d:
                del d[adapter_name]

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        super().enable_adapter_layers(enabled)
        self.prefixes_disabled = not enabled

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(f"{self.method.peft_type} adapters include a prefix and non-linear (or gated) adapters; "
                         "they cannot be merged into the base weights. Use unload() to get the base model back.")

    def _unwrap(self, merge: bool, safe_merge: bool = False, adapter_names: Any = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names)
        self._remove_hooks()
        for name, layer in reversed(list(self.adapter_layers())):  # inner (nested) layers first
            if hasattr(layer, "on_unwrap"):
                layer.on_unwrap()
            parent, attr = _get_parent(self.model, name)
            setattr(parent, attr, layer.base_layer)
        return super()._unwrap(merge=False)

    # ------------------------------------------------------------------------------------------ checkpoints
    def adapterhub_key_map(self, adapter_name: str, ah_name: str, head_prefix: str) -> dict[str, str]:
        """AdapterHub key suffixes -> our checkpoint keys for the LoRA layers, the prefix and its gates (the
        bottleneck adapters are mapped by engine/adapterhub.py). ``head_prefix``: the model path before the blocks
        (``model.``, ``bert.``), absent from a bare model's AdapterHub keys."""
        from peftkit.engine.save_load import CHECKPOINT_PREFIX

        def ah_path(path: str) -> str:
            path = path.replace(".base_layer", "")
            return path[len(head_prefix):] if head_prefix and path.startswith(head_prefix) else path

        out: dict[str, str] = {}
        for path, layer in self.adapter_layers():
            if adapter_name not in getattr(layer, "lora_A", {}):
                continue
            ours = f"{CHECKPOINT_PREFIX}{path}."
            where = f"{ah_path(path)}.loras.{ah_name}."
            out[where + "lora_A"], out[where + "lora_B"] = ours + "lora_A.weight", ours + "lora_B.weight"
            if adapter_name in layer.lora_gate:
                out[where + "gate.weight"], out[where + "gate.bias"] = ours + "lora_gate.weight", ours + "lora_gate.bias"
        paths = {id(m): n for n, m in self.model.named_modules()}
        if isinstance(self.prefix_tuning[adapter_name] if adapter_name in self.prefix_tuning else None,
                      HybridPrefixGroup):
            # encoder-decoder: the pool (all three locations) at the root and again under every attention
            sites = seq2seq_prefix_sites(self.model)
            where = [""] + [f"{ah_path(p)}.prefix_tuning.pool." for p, _, _, _ in sites]
            for rest in self.prefix_tuning[adapter_name].state_dict():
                for w in where:
                    out[f"{w}prefix_tuning.prefix_tunings.{ah_name}.{rest}".replace(
                        "prefix_tuning.pool.prefix_tuning.", "prefix_tuning.pool.")] = f"base_model.prefix_tuning.{rest}"
            if adapter_name in self.prefix_gates:
                for i, (p, _, _, _) in enumerate(sites):
                    for rest in ("weight", "bias"):
                        out[f"{ah_path(p)}.prefix_tuning.prefix_gates.{ah_name}.{rest}"] = \
                            f"base_model.prefix_gates.{i}.{rest}"
            return out
        if adapter_name in self.prefix_tuning:
            # AdapterHub's pool at the root, and the same tensors again under every self-attention layer
            where = [""] + [f"{ah_path(paths[id(a)])}.prefix_tuning.pool." for a in self_attention_modules(self.model)]
            for rest in self.prefix_tuning[adapter_name].state_dict():
                for w in where:
                    out[f"{w}prefix_tuning.prefix_tunings.{ah_name}.self_prefix.{rest}".replace(
                        "prefix_tuning.pool.prefix_tuning.", "prefix_tuning.pool.")] = f"base_model.prefix_tuning.{rest}"
        if adapter_name in self.prefix_gates:
            for i, attn in enumerate(self_attention_modules(self.model)):
                for rest in ("weight", "bias"):
                    out[f"{ah_path(paths[id(attn)])}.prefix_tuning.prefix_gates.{ah_name}.{rest}"] = \
                        f"base_model.prefix_gates.{i}.{rest}"
        return out

    def engine_adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for attr in ("prefix_tuning", "prefix_gates"):
            d = getattr(self, attr)
            if adapter_name in d:
                out.update({f"base_model.{attr}.{k}": p for k, p in d[adapter_name].state_dict(keep_vars=True).items()})
        return out


__all__ = ["HybridConfig", "HybridModel", "HybridPrefix", "HybridPrefixGroup", "PrefixSpec", "self_attention_modules",
           "seq2seq_prefix_sites"]
