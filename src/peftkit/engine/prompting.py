"""The engine's third kind of method: methods that act on the whole model, not by wrapping one layer.

Prompt tuning, P-tuning (soft tokens prepended to the input embeddings) and prefix tuning (key/value prefixes in every
attention layer, through the model's own KV cache) share one mechanism here:

* a method's config (a :class:`PromptLearningConfig`) builds one :class:`PromptModule` per adapter, which returns the
  adapter's prompt as one tensor: ``(virtual tokens, token_dim)`` for soft tokens, ``(virtual tokens, layers * 2 *
  kv_dim)`` for prefixes;
* :class:`PromptLearningModel` (the engine for these methods, a subclass of
  :class:`~peftkit.engine.tuner.AdapterModel`, so named adapters, ``modules_to_save``, save/load and the CLI work as
  for every other method) puts the prompt into the model's inputs with a forward pre-hook on the wrapped model (and,
  for encoder-decoder models with soft tokens, on its encoder). The hook rewrites the call's arguments and nothing
  else: attention masks get ones for the virtual tokens, causal-LM labels get -100, ``token_type_ids`` get zeros, and
  for prefixes a fresh cache holding them is passed as the ``cache`` (transformers >= 5.24) or ``past_key_values``
  argument. Because the hook sees every call of the model, ``generate()`` (with or without a KV cache) needs nothing
  special: a call whose cache is empty gets the prompt, a call whose cache is already filled (a later generation step)
  only gets its attention mask extended.

No state is kept between calls but the configuration (the active adapter and whether adapters are disabled), so
activation checkpointing recomputes the same thing. During training (grad enabled, ``model.training``) or with
``use_cache=False`` the prefix cache does not store the real tokens' keys and values, so a recomputed layer sees the
same prefix again instead of a grown cache.

Reusable parts for methods that combine a prefix with layer adapters (MAM, UniPELT): :func:`add_prefix_to_call`
(the cache logic of one call, from any forward pre-hook), :func:`layer_keys_values`, :func:`build_prefix_cache`,
:func:`keep_cache_under_checkpointing`, and ``PrefixEncoder`` (``methods/prompts/prefix_tuning.py``).

Checkpoints use Hugging Face PEFT's layout: one tensor ``prompt_embeddings`` (the prompt as the model uses it, i.e.
after any reparameterisation network) plus the ``modules_to_save`` copies under ``base_model.<path>``. Loading a
checkpoint gives the prompt as a plain table (the reparameterisation network is not saved, as in PEFT), which is also
how an adapter can be "exported" in memory with :meth:`PromptLearningModel.export_prompt`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftConfig
from peftkit.engine.tuner import AdapterModel, _check_adapter_name

logger = logging.getLogger(__name__)

CACHE_KWARGS = ("cache", "past_key_values")  # the KV-cache argument: transformers >= 5.24, then older releases
TOKENS, PREFIX = "tokens", "prefix"


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods (names as in Hugging Face PEFT). The model dimensions are read
    from the base model's config when left unset."""

    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens (prompt length)."})
    token_dim: Optional[int] = field(
        default=None, metadata={"help": "Hidden size of the base model (for prefixes: key/value heads * head size)."}
    )
    num_transformer_submodules: Optional[int] = field(
        default=None, metadata={"help": "1, or 2 for encoder-decoder models (SEQ_2_SEQ_LM)."}
    )
    num_attention_heads: Optional[int] = field(
        default=None, metadata={"help": "Attention heads of the base model (for prefixes: key/value heads)."}
    )
    num_layers: Optional[int] = field(default=None, metadata={"help": "Number of transformer layers."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules (e.g. a classifier head) trained in full and saved with the adapter."}
    )

    is_prompt_learning: ClassVar[bool] = True
    prompt_kind: ClassVar[str] = TOKENS  # TOKENS: prepended to the input embeddings; PREFIX: key/value prefixes

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__}.num_virtual_tokens must be a positive integer, got {n!r}.")
        for name in ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer or None, got {v!r}.")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # -------------------------------------------------------------------------------- what a method provides
    def build_prompt_module(self, model: nn.Module, word_embeddings: nn.Embedding, table: bool) -> "PromptModule":
        """The adapter's prompt module. ``table=True``: a plain table of the prompt as the model uses it (what a
        checkpoint holds), without any reparameterisation network."""
        raise NotImplementedError

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


class PromptModule(nn.Module):
    """One adapter's prompt. ``embedding`` holds the trained table; ``forward()`` returns the prompt (rows, dim)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)

    @property
    def is_table(self) -> bool:
        """Whether the prompt is the table itself (no reparameterisation network)."""
        return True

    def encode(self, table: torch.Tensor) -> torch.Tensor:
        """The reparameterisation: the table (rows, dim_in) -> the prompt (rows, dim_out). Identity by default."""
        return table

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight
        return table if self.is_table else self.encode(table)

    def export(self) -> torch.Tensor:
        with torch.no_grad():
            return self().detach()


# --------------------------------------------------------------------------------------- model introspection
def model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:  # pragma: no cover - odd configs
            pass
    return config


def _first_attr(obj: Any, names: Iterable[str]) -> Optional[int]:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def model_dims(model: nn.Module, method: str) -> dict[str, Optional[int]]:
    """The dimensions a prompt needs, read from the model's config; a clear error when there is none."""
    config = model_config(model)
    if config is None:
        raise ValueError(
            f"{method} reads the model's dimensions from its config, and {type(model).__name__} has no `config`; "
            "use a transformers model, or set num_layers, token_dim and num_attention_heads in the config."
        )
    return {
        "num_layers": _first_attr(config, ("num_hidden_layers", "num_layers", "n_layer")),
        "hidden": _first_attr(config, ("hidden_size", "n_embd", "d_model")),
        "heads": _first_attr(config, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")),
        "kv_heads": _first_attr(config, ("num_key_value_heads",)),
        "head_dim": _first_attr(config, ("head_dim", "d_kv")),
    }


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def forward_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def cache_argument(model: nn.Module) -> Optional[str]:
    """The name under which ``model`` takes a KV cache (``cache`` or ``past_key_values``), or None."""
    params = forward_parameters(model)
    for name in CACHE_KWARGS:
        if name in params:
            return name
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        # e.g. BertForSequenceClassification passes **kwargs on to its backbone: use the backbone's name
        for child in model.children():
            if isinstance(child, nn.Module) and hasattr(child, "config"):
                inner = forward_parameters(child)
                for name in CACHE_KWARGS:
                    if name in inner:
                        return name
    return None


def _cache_of(kwargs: dict[str, Any]) -> Any:
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cached_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuples
        return int(cache[0][0].shape[-2])
    return 0


# ------------------------------------------------------------------------------------------- prefix caches
def _prefix_layer_class() -> Optional[type]:
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers < 4.56: no per-layer cache objects
        return None

    class PrefixLayer(DynamicLayer):
        """A cache layer that starts with the prefix. ``frozen``: the real tokens' keys/values are returned after the
        prefix but not stored, so that recomputing a layer (activation checkpointing) sees the same keys again."""

        def __init__(self, frozen: bool) -> None:
            super().__init__()
            self.frozen = frozen

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if self.frozen:
                if not self.is_initialized:  # an empty (cross-attention) layer
                    return key_states, value_states
                return (torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=-2),
                        torch.cat([self.values, value_states.to(self.values.dtype)], dim=-2))
            return super().update(key_states, value_states, *args, **kwargs)

    return PrefixLayer


_PREFIX_LAYER: list = []


def build_prefix_cache(keys_values: Sequence[tuple[torch.Tensor, torch.Tensor]], frozen: bool, encoder_decoder: bool) -> Any:
    """A transformers cache whose layer ``i`` starts with ``keys_values[i]`` (each (batch, heads, tokens, head_dim)).
    For encoder-decoder models the prefixes go to the decoder's self-attention; the cross-attention cache is empty."""
    from transformers import DynamicCache

    if not _PREFIX_LAYER:
        _PREFIX_LAYER.append(_prefix_layer_class())
    layer_cls = _PREFIX_LAYER[0]
    if layer_cls is None:
        cache = DynamicCache.from_legacy_cache(tuple(keys_values))  # pragma: no cover - old transformers
    else:
        cache = DynamicCache()
        layers = []
        for k, v in keys_values:
            layer = layer_cls(frozen)
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            layers.append(layer)
        cache.layers = layers
    if encoder_decoder:
        from transformers import EncoderDecoderCache

        cross = DynamicCache()
        if frozen and layer_cls is not None:
            # nothing of the cross-attention is kept either, so a recomputed decoder layer computes it again
            cross.layers = [layer_cls(True) for _ in keys_values]
        cache = EncoderDecoderCache(cache, cross)
        if frozen:
            cache.is_updated = _NeverUpdated(cache.is_updated)
    return cache


class _NeverUpdated(dict):
    """``EncoderDecoderCache.is_updated`` of a frozen cache: no layer is ever marked as holding its cross-attention
    keys, so each call (and each recomputation) projects them again."""

    def __setitem__(self, key: Any, value: Any) -> None:
        dict.__setitem__(self, key, False)


def layer_keys_values(chunk: torch.Tensor, heads: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's share of a prefix, (tokens, 2 * heads * head_dim) -> (key, value), each (batch, heads, tokens,
    head_dim). Within the whole prefix (tokens, layers * 2 * heads * head_dim) the last index is
    ((layer * 2 + kv) * heads + head) * head_dim + dim (PEFT's and AdapterHub's layout)."""
    n = chunk.shape[0]
    x = chunk.reshape(n, 2, heads, -1).permute(1, 2, 0, 3)  # (2, heads, tokens, head_dim)
    return x[0].unsqueeze(0).expand(batch, -1, -1, -1), x[1].unsqueeze(0).expand(batch, -1, -1, -1)


def seq2seq_prefix_layer(i: int, num_layers: int) -> int:
    """Which prefix decoder layer ``i`` of an encoder-decoder model gets, as in Hugging Face PEFT (for checkpoint
    parity): PEFT concatenates the prefixes twice and deals them out four tensors per layer, so decoder layer ``i``
    gets prefix ``(2 i) mod layers`` in its self-attention (and its cross-attention ones are dropped)."""
    return (2 * i) % num_layers


def _ones(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, n, dtype=like.dtype, device=like.device)


def _prepend(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([_ones(mask.shape[0], n, mask), mask], dim=1)


def _batch_size(kwargs: dict[str, Any]) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        if kwargs.get(key) is not None:
            return int(kwargs[key].shape[0])
    enc = kwargs.get("encoder_outputs")
    if enc is not None:
        return int(enc[0].shape[0])
    return None


def _input_length(kwargs: dict[str, Any], decoder: bool) -> Optional[int]:
    keys = ("decoder_input_ids", "decoder_inputs_embeds") if decoder else ("input_ids", "inputs_embeds")
    for key in keys:
        if kwargs.get(key) is not None:
            return int(kwargs[key].shape[1])
    return None


# ------------------------------------------------------------------------------------------------ the engine
class PromptLearningModel(AdapterModel):
    """Engine of the prompt-learning methods: one :class:`PromptModule` per named adapter (in ``prompt_encoder``),
    put into the model's inputs by forward pre-hooks. One adapter is active at a time."""

    # PEFT saves a prompt-learning adapter's modules_to_save under base_model.<path> (its PeftModel holds the
    # transformers model directly), not base_model.model.<path>
    checkpoint_prefix = "base_model."

    def __init__(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default", loading: bool = False) -> None:
        nn.Module.__init__(self)
        self.model = model
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.active_adapters: list[str] = []
        self.prompt_encoder = nn.ModuleDict()
        self.prompts_disabled = False
        self._hook_handles: list[Any] = []
        self.inject_adapter(adapter_name, config, loading=loading)
        self._install_hooks()

    # ------------------------------------------------------------------------------------------ setup
    def word_embeddings(self) -> nn.Embedding:
        fn = getattr(self.model, "get_input_embeddings", None)
        emb = None
        try:
            emb = fn() if callable(fn) else None
        except Exception:
            emb = None
        if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
            raise ValueError(
                f"Prompt-learning methods need the model's input embeddings, and {type(self.model).__name__} has no "
                "get_input_embeddings() returning an embedding layer; use a transformers model."
            )
        return emb

    def _check_supported(self, config: PromptLearningConfig) -> None:
        cls = type(self.model).__name__
        params = forward_parameters(self.model)
        method = type(config).__name__
        if config.prompt_kind == TOKENS:
            target = self.model.get_encoder() if is_encoder_decoder(self.model) and hasattr(self.model, "get_encoder") else self.model
            if "inputs_embeds" not in forward_parameters(target):
                raise ValueError(
                    f"{method} prepends soft tokens to the input embeddings, but {type(target).__name__}.forward takes "
                    "no `inputs_embeds` argument; this architecture is not supported."
                )
        else:
            if cache_argument(self.model) is None:
                raise ValueError(
                    f"{method} passes key/value prefixes through the model's cache, but {cls}.forward takes neither "
                    "`cache` nor `past_key_values`; this architecture is not supported."
                )
        if not params:
            raise ValueError(f"Cannot read the forward signature of {cls}.")

    def fill_config(self, config: PromptLearningConfig) -> PromptLearningConfig:
        """Fill the model dimensions PEFT fills (``num_layers``, ``token_dim``, ``num_attention_heads``,
        ``num_transformer_submodules``) from the model's config."""
        method = type(config).__name__
        need = [f for f in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, f) is None]
        dims = model_dims(self.model, method) if need or config.prompt_kind == PREFIX else {}
        if config.num_layers is None:
            config.num_layers = dims["num_layers"]
            decoder_layers = _first_attr(model_config(self.model), ("num_decoder_layers",))
            if config.prompt_kind == PREFIX and is_encoder_decoder(self.model) and decoder_layers:
                config.num_layers = decoder_layers  # the prefixes go to the decoder (PEFT assumes equal counts)
        if config.token_dim is None:
            config.token_dim = dims["hidden"]
        if config.num_attention_heads is None:
            config.num_attention_heads = dims["heads"]
        missing = [f for f in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, f) is None]
        if missing:
            raise ValueError(
                f"{method}: could not read {', '.join(missing)} from the config of {type(self.model).__name__}; "
                "set them in the config."
            )
        if config.prompt_kind == PREFIX and "token_dim" in need and "num_attention_heads" in need:
            # keys/values have num_key_value_heads heads of head_dim each (grouped-query attention, or a head size
            # that is not hidden / heads): size the prefix for what the attention layers cache
            kv_heads = dims["kv_heads"] or config.num_attention_heads
            head_dim = dims["head_dim"] or config.token_dim // config.num_attention_heads
            config.token_dim = kv_heads * head_dim
            config.num_attention_heads = kv_heads
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 2 if str(config.task_type) == "SEQ_2_SEQ_LM" else 1
        if config.prompt_kind == PREFIX:
            if config.token_dim % config.num_attention_heads:
                raise ValueError(
                    f"{method}: token_dim ({config.token_dim}) must be a multiple of num_attention_heads "
                    f"({config.num_attention_heads}) (token_dim = key/value heads * head size)."
                )
            self._check_prefix_geometry(config, dims, method)
        return config

    def _check_prefix_geometry(self, config: PromptLearningConfig, dims: dict[str, Optional[int]], method: str) -> None:
        """The prefix must have the shape of what the attention layers cache; otherwise the failure would come from
        deep inside the attention with no hint of the cause."""
        cls = type(self.model).__name__
        heads = dims.get("heads")
        kv_heads = dims.get("kv_heads") or heads
        head_dim = dims.get("head_dim") or (dims["hidden"] // heads if dims.get("hidden") and heads else None)
        given = (config.num_attention_heads, config.token_dim // config.num_attention_heads)
        if kv_heads and head_dim and given != (kv_heads, head_dim):
            raise ValueError(
                f"{method}: the prefix would have {given[0]} heads of size {given[1]} (num_attention_heads="
                f"{config.num_attention_heads}, token_dim={config.token_dim}), but the attention layers of {cls} cache "
                f"{kv_heads} key/value heads of size {head_dim}; leave token_dim and num_attention_heads unset, or set "
                f"num_attention_heads={kv_heads} and token_dim={kv_heads * head_dim}."
            )
        layers = _first_attr(model_config(self.model), ("num_decoder_layers",)) if is_encoder_decoder(self.model) else None
        layers = layers or dims.get("num_layers")
        if layers and config.num_layers != layers:
            raise ValueError(f"{method}: num_layers={config.num_layers}, but {cls} has {layers} attention layers that "
                             "take the prefix; leave num_layers unset.")

    def inject_adapter(self, adapter_name: str, config: PromptLearningConfig, loading: bool = False) -> None:
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name or delete it first.")
        if not isinstance(config, PromptLearningConfig):
            raise ValueError(f"{type(config).__name__} is not a prompt-learning config and cannot be added to this model.")
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if str(first.peft_type) != str(config.peft_type):
                raise ValueError(
                    f"This model holds {first.peft_type} adapters; an adapter of another method ({config.peft_type}) "
                    "cannot be added to it."
                )
        self._check_supported(config)
        config = self.fill_config(config)
        emb = self.word_embeddings()
        module = config.build_prompt_module(self.model, emb, table=bool(loading or config.inference_mode))
        from peftkit.methods.common import adapter_dtype

        module.to(device=emb.weight.device, dtype=adapter_dtype(emb.weight))
        first_adapter = not self.peft_config
        self.peft_config[adapter_name] = config
        self.prompt_encoder[adapter_name] = module
        try:
            self._add_modules_to_save(adapter_name, config)
        except Exception:
            self._discard_partial_adapter(adapter_name)
            raise
        if first_adapter:
            for name, p in self.model.named_parameters():
                if ".modules_to_save." not in name:
                    p.requires_grad_(False)
            self.active_adapters = [adapter_name]
            if config.prompt_kind == PREFIX:
                self._cache_readers = keep_cache_under_checkpointing(self.model)  # undone by unload()
        self.set_adapter(self.active_adapters)


    def _discard_partial_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        super()._discard_partial_adapter(adapter_name)
        if not self.peft_config:
            self._remove_hooks()

    def _install_hooks(self) -> None:
        self._remove_hooks()
        self._cache_name = cache_argument(self.model)  # read once: inspecting the signature at every call is slow
        self._hook_handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        if is_encoder_decoder(self.model) and hasattr(self.model, "get_encoder"):
            encoder = self.model.get_encoder()
            if encoder is not None and encoder is not self.model:
                self._hook_handles.append(encoder.register_forward_pre_hook(self._before_encoder, with_kwargs=True))

    def _remove_hooks(self) -> None:
        for h in getattr(self, "_hook_handles", []):
            h.remove()
        self._hook_handles = []

    # ------------------------------------------------------------------------------------------ management
    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"No adapter named {n!r}; this model has: {', '.join(self.peft_config) or 'none'}.")
        if len(names) != 1:
            raise ValueError(
                f"{self.method.peft_type} adapters cannot be combined: activate exactly one (got {names})."
            )
        for n, module in self.prompt_encoder.items():
            module.requires_grad_(n == names[0] and not inference_mode)  # PEFT's rule (engine's set_adapter)
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.set_adapter(names)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; this model has: {', '.join(self.peft_config)}.")
        del self.prompt_encoder[adapter_name]
        self._forget_adapter(adapter_name)

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        self.prompts_disabled = not enabled
        for _, wrapper in self.modules_to_save_wrappers():
            wrapper.adapters_disabled = not enabled

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(
            f"{self.method.peft_type} adds virtual tokens to the input; there are no weights to merge them into. "
            "Use unload() to get the base model back."
        )

    def unmerge_adapter(self) -> None:
        pass

    def unload(self) -> nn.Module:
        self._remove_hooks()
        for module in getattr(self, "_cache_readers", []):
            del module._can_checkpoint_with_cache
        self._cache_readers = []
        return self._unwrap(merge=False)

    # ------------------------------------------------------------------------------------------ checkpoints
    def engine_adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        module = self.prompt_encoder[adapter_name]
        # a table is saved (and loaded) in place; a reparameterised prompt is saved as the network's output
        return {"prompt_embeddings": module.embedding.weight if module.is_table else module.export()}

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The prompt as saved in a checkpoint (PEFT's method name)."""
        return self.prompt_encoder[adapter_name].export().cpu()

    def checkpoint_tensors_to_load(self, adapter_name: str, tensors: dict[str, torch.Tensor],
                                   saved_config: Any = None) -> dict[str, torch.Tensor]:
        """A checkpoint holds the prompt itself (``prompt_embeddings``), not the reparameterisation network (prefix
        MLP, P-tuning encoder) that computed it: loading it into an existing adapter that still has its network
        first turns the adapter into the table (:meth:`export_prompt`), which then receives the checkpoint's
        prompt (copying into the network's output would change nothing)."""
        from peftkit.integrations.distributed import any_sharded

        module = self.prompt_encoder[adapter_name] if adapter_name in self.prompt_encoder else None
        value = tensors.get("prompt_embeddings")
        if module is None or module.is_table or value is None:
            return tensors
        if any_sharded(module.parameters()):
            raise ValueError(
                f"Adapter {adapter_name!r} computes its prompt with a reparameterisation network whose parameters are "
                "sharded (FSDP2 / ZeRO-3); a checkpoint holds only the prompt, which cannot replace the sharded "
                "network. Load the adapter before sharding (PeftModel.from_pretrained(base, path, is_trainable=True), "
                "then fully_shard), or save and load the network's own parameters.")
        if tuple(value.shape) == tuple(module.export().shape):  # otherwise the load refuses it, model unchanged
            self.export_prompt(adapter_name)
        return tensors

    def export_prompt(self, adapter_name: Optional[str] = None) -> None:
        """Replace an adapter's reparameterisation network (prefix MLP, P-tuning encoder) by the prompt it computes,
        so inference runs without it; outputs are unchanged. What a saved-and-loaded adapter holds anyway."""
        name = adapter_name or self.active_adapters[0]
        module = self.prompt_encoder[name]
        if module.is_table:
            return
        value = module.export()
        table = PromptModule(value.shape[0], value.shape[1]).to(device=value.device, dtype=value.dtype)
        with torch.no_grad():
            table.embedding.weight.copy_(value)
        table.requires_grad_(module.embedding.weight.requires_grad)
        self.prompt_encoder[name] = table

    # ------------------------------------------------------------------------------------------ the forward path
    def _active(self) -> Optional[tuple[PromptLearningConfig, PromptModule]]:
        if self.prompts_disabled or not self.active_adapters:
            return None
        name = self.active_adapters[0]
        return self.peft_config[name], self.prompt_encoder[name]

    @staticmethod
    def _named(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if args:
            names = [n for n, p in forward_parameters(module).items()
                     if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            if len(args) > len(names):
                raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments.")
            for n, a in zip(names, args):
                kwargs[n] = a
        return kwargs

    def _soft_tokens(self, config: PromptLearningConfig, module: PromptModule, batch: int, dtype: torch.dtype) -> torch.Tensor:
        prompt = module()[: config.num_virtual_tokens]  # encoder-decoder: the encoder's share (PEFT)
        return prompt.to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple]:
        active = self._active()
        if active is None:
            return None
        config, prompt = active
        kwargs = self._named(module, args, kwargs)
        n = config.num_virtual_tokens
        if config.prompt_kind == PREFIX:
            self._add_prefix(module, kwargs, config, prompt)
        elif is_encoder_decoder(module):
            # the encoder's hook prepends the tokens; here only the mask the decoder's cross-attention reads
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                enc = kwargs.get("encoder_outputs")
                if enc is None or mask.shape[1] == enc[0].shape[1] - n:
                    kwargs["attention_mask"] = _prepend(mask, n)
        else:
            self._add_soft_tokens(kwargs, config, prompt, causal=True)
        return (), kwargs

    def _before_encoder(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Optional[tuple]:
        active = self._active()
        if active is None or active[0].prompt_kind != TOKENS:
            return None
        kwargs = self._named(module, args, kwargs)
        self._add_soft_tokens(kwargs, active[0], active[1], causal=False)
        return (), kwargs

    def _add_soft_tokens(self, kwargs: dict[str, Any], config: PromptLearningConfig, prompt: PromptModule, causal: bool) -> None:
        n = config.num_virtual_tokens
        past = cached_length(_cache_of(kwargs))
        mask = kwargs.get("attention_mask")
        if past > 0:
            # a later generation step: the cache holds the virtual tokens, the attention mask does not yet
            new = _input_length(kwargs, decoder=False) or 0
            if mask is not None and mask.dim() == 2 and mask.shape[1] == past + new - n:
                kwargs["attention_mask"] = _prepend(mask, n)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            ids = kwargs.get("input_ids")
            if ids is None:
                return
            embeds = self.word_embeddings()(ids)
        batch, length = embeds.shape[:2]
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([self._soft_tokens(config, prompt, batch, embeds.dtype), embeds], dim=1)
        if mask is not None and mask.dim() == 2 and mask.shape[1] == length:
            kwargs["attention_mask"] = _prepend(mask, n)
        labels = kwargs.get("labels")
        if causal and labels is not None and labels.dim() == 2 and labels.shape[1] == length:
            kwargs["labels"] = torch.cat([torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device), labels], 1)
        tt = kwargs.get("token_type_ids")
        if tt is not None and tt.dim() == 2:
            kwargs["token_type_ids"] = torch.cat([torch.zeros(batch, n, dtype=tt.dtype, device=tt.device), tt], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None and pos.dim() == 2:
            # the virtual tokens take positions 0..n-1 and the real tokens follow them (left padding is kept)
            virtual = torch.arange(n, dtype=pos.dtype, device=pos.device).unsqueeze(0).expand(pos.shape[0], -1)
            kwargs["position_ids"] = torch.cat([virtual, pos + n], dim=1)

    def prefix_keys_values(self, config: PromptLearningConfig, prompt: PromptModule, batch: int, dtype: torch.dtype,
                           encoder_decoder: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The per-layer (key, value) prefixes of the active adapter, each (batch, kv_heads, tokens, head_dim)."""
        layers = config.num_layers
        wanted = [seq2seq_prefix_layer(i, layers) if encoder_decoder else i for i in range(layers)]
        if hasattr(prompt, "layer_prefixes"):  # one graph per layer (see PrefixEncoder)
            chunks = prompt.layer_prefixes(wanted)
        else:
            whole = prompt()
            width = whole.shape[1] // layers
            chunks = [whole[:, i * width:(i + 1) * width] for i in wanted]
        return [layer_keys_values(c.to(dtype), config.num_attention_heads, batch) for c in chunks]

    def _add_prefix(self, module: nn.Module, kwargs: dict[str, Any], config: PromptLearningConfig, prompt: PromptModule) -> None:
        emb = self.word_embeddings().weight
        dtype = emb.dtype if emb.dtype.is_floating_point else torch.float32
        add_prefix_to_call(module, kwargs, config.num_virtual_tokens,
                           lambda batch, encdec: self.prefix_keys_values(config, prompt, batch, dtype, encdec),
                           cache_name=self._cache_name)


def add_prefix_to_call(module: nn.Module, kwargs: dict[str, Any], n: int,
                       keys_values: Callable[[int, bool], list[tuple[torch.Tensor, torch.Tensor]]],
                       cache_name: Optional[str] = None) -> None:
    """Put key/value prefixes of length ``n`` into the arguments of one call of ``module`` (a transformers model), in
    place: a call with an empty (or no) cache gets a fresh prefix cache built from ``keys_values(batch,
    encoder_decoder)`` (per layer (key, value), each (batch, kv_heads, n, head_dim)), its attention mask n leading ones
    and its position ids an offset of n; a call whose cache is filled (a later generation step) only gets its mask and
    position ids adjusted. Reusable by any method that adds prefixes (e.g. hybrids) from its own forward pre-hook."""
    encdec = is_encoder_decoder(module)
    cache = _cache_of(kwargs)
    past = cached_length(cache)
    mask_key = "decoder_attention_mask" if encdec else "attention_mask"
    pos_key = "decoder_position_ids" if encdec else "position_ids"
    mask = kwargs.get(mask_key)
    if past > 0:  # a later generation step: the cache starts with the prefix, the mask does not yet
        new = _input_length(kwargs, decoder=encdec) or 0
        if mask is not None and mask.dim() == 2 and mask.shape[1] == past + new - n:
            kwargs[mask_key] = _prepend(mask, n)
        if kwargs.get(pos_key) is not None:
            kwargs[pos_key] = kwargs[pos_key] + n
        return
    batch = _batch_size(kwargs)
    if batch is None:
        return
    frozen = (module.training and torch.is_grad_enabled()) or kwargs.get("use_cache") is False
    new_cache = build_prefix_cache(keys_values(batch, encdec), frozen, encdec)
    for name in CACHE_KWARGS:
        kwargs.pop(name, None)
    kwargs[cache_name or cache_argument(module) or CACHE_KWARGS[0]] = new_cache
    if mask is not None and mask.dim() == 2:
        kwargs[mask_key] = _prepend(mask, n)
    if kwargs.get(pos_key) is not None:
        kwargs[pos_key] = kwargs[pos_key] + n


def keep_cache_under_checkpointing(model: nn.Module) -> list[nn.Module]:
    """transformers drops the cache argument of a checkpointed layer (its recomputation would write the cache a second
    time) unless the layer says it only reads it. Under training (the only time checkpointing runs) a prefix cache is
    read-only (``frozen``), so the layers are told so. Returns the layers changed (for undoing)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - old transformers
        return []
    changed = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and "_can_checkpoint_with_cache" not in vars(module):
            module._can_checkpoint_with_cache = True
            changed.append(module)
    return changed
