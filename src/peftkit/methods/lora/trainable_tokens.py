"""Trainable tokens (``LoraConfig.trainable_token_indices``): train only chosen rows of an embedding matrix, next
to the LoRA adapters (e.g. new special tokens), instead of the whole embedding (``modules_to_save``).

The embedding ``emb`` becomes ``TrainableTokensWrapper`` whose ``token_adapter`` (:class:`TrainableTokensLayer`)
holds, per adapter, the trained rows ``trainable_tokens_delta[adapter]`` (k x dim; despite PEFT's name these are the
new values of the rows, initialised to the current ones) and the original rows (to unmerge). The forward embeds
with ``W.index_copy(0, indices, values)``; merging writes the rows into ``W``. Checkpoint key (as PEFT):
``<emb>.token_adapter.trainable_tokens_delta``.

Tied weights: when the model ties an output layer to the input embedding (``tie_word_embeddings``; the weight is
the same tensor), that layer is wrapped too and shares the embedding's rows (nothing of it is saved), so the tie
holds during training. ``ensure_weight_tying`` makes that explicit: indices given for both tied layers must agree.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.layer import AdapterLayer, innermost_base


class _Originals(nn.Module):
    """Adapter name -> the original rows, as non-persistent buffers (they move with the model, are not saved)."""

    def __init__(self) -> None:
        super().__init__()
        self._names: list[str] = []

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(f"_b_{name}", value, persistent=False)
        if name not in self._names:
            self._names.append(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, f"_b_{name}")

    def __delitem__(self, name: str) -> None:
        delattr(self, f"_b_{name}")
        self._names.remove(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def keys(self) -> list[str]:
        return list(self._names)


class TrainableTokensLayer(AdapterLayer):
    """Trainable rows of an ``nn.Embedding`` (or of an ``nn.Linear`` tied to one, through ``tied_to``)."""

    adapter_slots = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, tied_to: Optional["TrainableTokensLayer"] = None) -> None:
        super().__init__(base_layer)
        base = innermost_base(base_layer)
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise ValueError(f"trainable_token_indices can target nn.Embedding layers (and linear layers tied to "
                             f"them), not {type(base).__name__}.")
        self._tied = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Originals()
            self.token_indices: dict[str, list[int]] = {}
        else:  # the same containers (not copies): one set of rows for both tied layers (in the model's
            # state_dict under both paths, as in PEFT; saved once, under the embedding)
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.trainable_tokens_original = tied_to.trainable_tokens_original
            self.token_indices = tied_to.token_indices

    @property
    def tied_adapter(self) -> Optional["TrainableTokensLayer"]:
        return self._tied[0] if self._tied else None

    def adapter_parameters(self, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
        if self.tied_adapter is not None:
            return iter(())  # the embedding's layer owns (and saves) them
        return super().adapter_parameters(adapter_name)

    def update_layer(self, adapter_name: str, config: Any = None, token_indices: Sequence[int] = (),
                     module_name: str = "", loading: bool = False, **kwargs: Any) -> None:
        if self.tied_adapter is not None:
            return
        base = self.get_base_layer()
        weight = base.weight
        n_rows = weight.shape[0]
        indices = [int(i) for i in token_indices]
        bad = [i for i in indices if not 0 <= i < n_rows]
        if bad or not indices:
            raise ValueError(f"trainable_token_indices for {module_name or 'the embedding'}: "
                             f"{'indices ' + str(bad[:5]) + ' are outside' if bad else 'an empty list is not'} "
                             f"the vocabulary range [0, {n_rows}); give token ids of that layer.")
        self.token_indices[adapter_name] = indices
        with torch.no_grad():
            originals = weight[torch.tensor(indices, device=weight.device)].detach().clone()
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(originals.clone())
        self.trainable_tokens_original[adapter_name] = originals

    def delete_adapter(self, adapter_name: str) -> None:
        if self.tied_adapter is None:
            super().delete_adapter(adapter_name)
            if adapter_name in self.trainable_tokens_original:
                del self.trainable_tokens_original[adapter_name]
            self.token_indices.pop(adapter_name, None)
        else:
            self.adapter_configs.pop(adapter_name, None)
            self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # ------------------------------------------------------------------------------------------------ math
    def _check_overlap(self, names: Sequence[str]) -> None:
        seen: set[int] = set()
        for n in dict.fromkeys(list(self.merged_adapters) + list(names)):
            idx = set(self.token_indices[n])
            if seen & idx:
                raise ValueError(f"Token indices of adapter {n!r} overlap those of another active or merged adapter "
                                 "on this embedding; only disjoint trainable_token_indices can be combined.")
            seen |= idx

    def merged_rows_weight(self, names: Sequence[str], weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.get_base_layer().weight if weight is None else weight
        for n in names:
            if n not in self.token_indices:
                continue
            index = torch.tensor(self.token_indices[n], device=w.device)
            w = w.index_copy(0, index, self.trainable_tokens_delta[n].to(w.dtype))
        return w

    def _call(self, x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings
            if isinstance(scale, (torch.Tensor, float)) and not callable(scale):
                out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
            return out
        return F.linear(x, weight, base.bias)

    def forward_adapters(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        names = [n for n in names if n in self.token_indices]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        self._check_overlap(names)
        return self._call(x, self.merged_rows_weight(names), *args, **kwargs)

    def apply_adapter(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # mixed batches: the rows of this adapter are recomputed with its token rows
        return self._call(x, self.merged_rows_weight([adapter_name]), *args, **kwargs).to(result.dtype)

    def first_nonfinite_merge(self, adapter_names: Sequence[str]) -> Optional[str]:
        for n in adapter_names:
            if n in self.trainable_tokens_delta and not bool(torch.isfinite(self.trainable_tokens_delta[n]).all()):
                return n
        return None

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n in self.token_indices and n not in self.merged_adapters]
        if not names:
            return
        self._check_overlap(names)
        if safe_merge and self.first_nonfinite_merge(names) is not None:
            raise ValueError(f"NaNs detected in the merged weights: the trainable tokens of adapter "
                             f"{self.first_nonfinite_merge(names)!r} are not finite; nothing was changed.")
        weight = self.get_base_layer().weight
        with torch.no_grad():
            weight.data.copy_(self.merged_rows_weight(names, weight.data))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            index = torch.tensor(self.token_indices[n], device=weight.device)
            with torch.no_grad():
                weight.data.index_copy_(0, index, self.trainable_tokens_original[n].to(weight.dtype))

    def extra_repr(self) -> str:
        return f"token_indices={self.token_indices}, " + super().extra_repr()


class TrainableTokensWrapper(nn.Module):
    """The module in the embedding's place: ``token_adapter`` does the work; attributes of the embedding
    (``num_embeddings``, ``padding_idx``, ...) read through; ``weight`` is the weight with the active rows."""

    def __init__(self, module: nn.Module, tied_to: Optional[TrainableTokensLayer] = None) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, tied_to=tied_to)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        layer = self.token_adapter
        if not isinstance(layer, TrainableTokensLayer):  # its last adapter was removed
            return layer.weight
        if layer.adapters_disabled or layer.merged:
            return layer.get_base_layer().weight
        return layer.merged_rows_weight([n for n in layer.active_adapters if n in layer.token_indices])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.token_adapter(x, *args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters that have trainable tokens here."""
        layer = self.token_adapter
        if not isinstance(layer, TrainableTokensLayer):
            return []
        return [n for n in layer.active_adapters if n in layer.token_indices]

    def check_set_adapter(self, names: Sequence[str], path: str = "") -> None:
        layer = self.token_adapter
        held = [n for n in names if isinstance(layer, TrainableTokensLayer) and n in layer.token_indices]
        if len(held) > 1 and layer.tied_adapter is None:
            raise ValueError(f"Only one adapter can be set at a time for TrainableTokensWrapper ({path or 'embedding'}"
                             f"), got {held}: each has its own trained rows here. Activate them one at a time.")

    def unwrapped(self) -> nn.Module:
        """What replaces this wrapper when the adapters are unloaded (merged first, if asked, by the engine)."""
        layer = self.token_adapter
        return layer.get_base_layer() if isinstance(layer, AdapterLayer) else layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "token_adapter":
                raise
            return getattr(innermost_base(self.token_adapter), name)


def _input_embedding_name(model: nn.Module) -> Optional[str]:
    fn = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(fn):
        try:
            emb = fn()
        except (NotImplementedError, AttributeError):
            emb = None
    if emb is not None:
        for name, module in model.named_modules():
            if module is emb:
                return name
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "embed_tokens"]
    return names[0] if names else None


def _find_module(model: nn.Module, key: str) -> list[str]:
    return [n for n, m in model.named_modules() if n and (n == key or n.endswith("." + key))
            and ".token_adapter" not in n and ".base_layer" not in n and ".modules_to_save" not in n
            and ".original_module" not in n]


def _weight_of(module: nn.Module) -> Optional[torch.Tensor]:
    if isinstance(module, TrainableTokensWrapper):
        return module.token_adapter.get_base_layer().weight
    if isinstance(module, AdapterLayer):
        return getattr(module.get_base_layer(), "weight", None)
    return getattr(module, "weight", None)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    if "." in path:
        parent, attr = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, new)
    else:
        setattr(model, path, new)


def _add_to(model: nn.Module, path: str, adapter_name: str, config: Any, indices: Sequence[int], loading: bool,
            tied_to: Optional[TrainableTokensLayer] = None) -> TrainableTokensLayer:
    module = model.get_submodule(path)
    if isinstance(module, TrainableTokensWrapper):
        layer = module.token_adapter
        if tied_to is not None and layer.tied_adapter is None:
            raise ValueError(f"trainable_token_indices: {path} has trainable tokens of its own and is tied to the "
                             "input embedding; target only the embedding (the tied layer follows it).")
    else:
        if isinstance(module, AdapterLayer):
            raise ValueError(f"trainable_token_indices targets {path}, which target_modules already adapts; an "
                             "embedding gets either LoRA or trainable tokens. Remove it from one of the two.")
        wrapper = TrainableTokensWrapper(module, tied_to=tied_to)
        _replace(model, path, wrapper)
        layer = wrapper.token_adapter
    layer.update_layer(adapter_name, config, token_indices=indices, module_name=path, loading=loading)
    layer.adapter_configs[adapter_name] = config
    return layer


def inject_trainable_tokens(engine: Any, adapter_name: str, config: Any, loading: bool = False) -> int:
    """Wrap the layers ``config.trainable_token_indices`` names (a list: the input embedding); return how many."""
    spec = getattr(config, "trainable_token_indices", None)
    if spec is None:
        return 0
    model = engine.model
    if isinstance(spec, dict):
        targets = {str(k): list(v) for k, v in spec.items()}
    else:
        name = _input_embedding_name(model)
        if name is None:
            raise ValueError("trainable_token_indices is a list, which means the input embedding, but this model has "
                             "no get_input_embeddings() and no 'embed_tokens' module; give a dict {layer name: "
                             "indices} instead.")
        targets = {name: list(spec)}
    for key in targets:
        if config.modules_to_save and key in config.modules_to_save:
            raise ValueError(f"The embedding layer {key} is both in modules_to_save (trained in full) and in "
                             "trainable_token_indices (some rows trained); use one of the two.")
    resolved: dict[str, list[int]] = {}
    for key, indices in targets.items():
        found = _find_module(model, key)
        if not found:
            raise ValueError(f"trainable_token_indices names {key!r}, but the model has no module of that name; use "
                             "the embedding's name (e.g. 'embed_tokens').")
        for path in found:
            resolved[path] = indices
    # tied layers: modules whose weight is the input embedding's weight tensor
    emb_name = _input_embedding_name(model)
    emb_weight = _weight_of(model.get_submodule(emb_name)) if emb_name else None
    model_config = getattr(model, "config", None)
    declared = getattr(model_config, "tie_word_embeddings", None)
    if hasattr(model_config, "get_text_config"):
        declared = getattr(model_config.get_text_config(), "tie_word_embeddings", declared)
    tied_paths = [] if emb_weight is None or declared is False else [
        n for n, m in model.named_modules()
        if n and n != emb_name and _weight_of(m) is emb_weight and ".base_layer" not in n and ".token_adapter" not in n
        and not (isinstance(m, AdapterLayer) and not isinstance(m, TrainableTokensLayer))]
    tied_paths = [p for p in tied_paths if not any(p.startswith(q + ".") for q in tied_paths)]
    ensure = bool(getattr(config, "ensure_weight_tying", False))
    if ensure and not tied_paths:
        warnings.warn("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). "
                      "Weight tying will not be applied for trainable_token_indices.")
    apply_tying = bool(tied_paths) and emb_name in resolved
    named_tied = [p for p in tied_paths if p in resolved]
    if apply_tying and named_tied:
        mismatch = [p for p in named_tied if resolved[p] != resolved[emb_name]]
        if mismatch and ensure:
            raise ValueError(
                "Cannot ensure weight tying when different token indices are specified for tied layers. Conflicting "
                f"layers: {emb_name}: {resolved[emb_name]}, " + ", ".join(f"{p}: {resolved[p]}" for p in mismatch)
                + ". Use the same indices for all tied layers or set ensure_weight_tying=False.")
        if mismatch:
            apply_tying = False  # each layer gets its own rows (the tie is broken, as in PEFT)
        else:
            for p in named_tied:
                resolved.pop(p)
    count = 0
    for path, indices in resolved.items():
        _add_to(model, path, adapter_name, config, indices, loading)
        count += 1
    if apply_tying:
        emb_layer = model.get_submodule(emb_name).token_adapter
        for path in tied_paths:
            _add_to(model, path, adapter_name, config, emb_layer.token_indices[adapter_name], loading, tied_to=emb_layer)
            count += 1
    return count
