"""The second hosting mechanism: adapters that act on a sub-layer's output (or beside it), not on one weight.

A transformer block has sub-layers (self-attention, cross-attention, feed-forward). Each ends the same way:

    h   = the sub-layer's output (after its output projection and dropout)
    out = LN(h + x)      post-LN models (BERT, RoBERTa): x is the sub-layer's input, LN its LayerNorm
    out = h + x          pre-LN models (T5, Llama, GPT-2, ViT): x is the residual stream

A sub-layer adapter replaces ``h`` by ``h' = f(h, x, LN)``; the model then computes ``LN(h' + x)`` or ``h' + x``
itself. So no forward code of any architecture is copied: :class:`SublayerAdapterLayer` wraps one *block* and
puts two permanent hooks on modules inside it, per sub-layer ("location"):

- a forward pre-hook on the module whose input is ``x`` records it;
- a forward hook on the module whose output is ``h`` replaces that output by ``h'``.

Both hooks run again when gradient checkpointing recomputes the block, so checkpointing works. What the hooks
need (active adapters, disabled flag, per-row adapter choice) is state of the wrapper module itself.

Where the sub-layers are is a :class:`Placement` table per ``model_type`` (:data:`PLACEMENTS`); any other model
works when the user names its modules (:func:`placements_from_names`). A method subclasses
:class:`SublayerAdapterLayer` and supplies ``apply_sublayer(adapter_name, location, h, x, layer_norm)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from peftkit.engine.layer import BASE_ADAPTER, AdapterLayer

# The three places a sub-layer adapter can sit (AdapterHub's names for them).
MH_ADAPTER = "mh_adapter"  # after (self-)attention
CROSS_ADAPTER = "cross_adapter"  # after cross-attention (encoder-decoder models)
OUTPUT_ADAPTER = "output_adapter"  # after the feed-forward block
LOCATIONS = (MH_ADAPTER, CROSS_ADAPTER, OUTPUT_ADAPTER)


@dataclass(frozen=True)
class Placement:
    """One sub-layer of a block, as paths relative to the block module.

    Attributes:
        location: one of :data:`LOCATIONS`.
        h_module: the module whose output is ``h`` (its first element if it returns a tuple).
        x_module: the module whose input is ``x``; ``x_arg`` is the positional index, ``x_kwarg`` the keyword
            name under which the model may pass it instead. ``""`` means the block itself.
        layer_norm: the LayerNorm that post-LN models apply to ``h + x`` (None for pre-LN models).
    """

    location: str
    h_module: str
    x_module: str
    x_arg: int = 0
    x_kwarg: Optional[str] = None
    layer_norm: Optional[str] = None


@dataclass(frozen=True)
class BlockPlacement:
    """The blocks of one kind (``block_pattern``: regex on the full module name) and their sub-layers."""

    block_pattern: str
    sublayers: tuple[Placement, ...]


def _post_ln(attn: str, out: str) -> tuple[Placement, ...]:
    """BERT-style blocks: ``<attn>`` and ``<out>`` compute LayerNorm(dropout(dense(.)) + input_tensor)."""
    return (
        Placement(MH_ADAPTER, f"{attn}.dropout", attn, 1, "input_tensor", f"{attn}.LayerNorm"),
        Placement(OUTPUT_ADAPTER, f"{out}.dropout", out, 1, "input_tensor", f"{out}.LayerNorm"),
    )


def _pre_ln(attn: str, attn_norm: str, mlp: str, mlp_norm: str) -> tuple[Placement, ...]:
    """Pre-LN decoder blocks: x is the input of each sub-layer's norm, h the sub-layer's output."""
    return (
        Placement(MH_ADAPTER, attn, attn_norm, 0, "hidden_states"),
        Placement(OUTPUT_ADAPTER, mlp, mlp_norm, 0, "hidden_states"),
    )


_BERT = (BlockPlacement(r"(.*\.)?encoder\.layer\.\d+", _post_ln("attention.output", "output")),)
_LLAMA = (BlockPlacement(r"(.*\.)?layers\.\d+", _pre_ln("self_attn", "input_layernorm", "mlp", "post_attention_layernorm")),)
_T5_SELF = Placement(MH_ADAPTER, "layer.0.dropout", "layer.0", 0, "hidden_states")
_T5 = (
    BlockPlacement(r"(.*\.)?encoder\.block\.\d+",
                   (_T5_SELF, Placement(OUTPUT_ADAPTER, "layer.1.dropout", "layer.1", 0, "hidden_states"))),
    BlockPlacement(r"(.*\.)?decoder\.block\.\d+",
                   (_T5_SELF, Placement(CROSS_ADAPTER, "layer.1.dropout", "layer.1", 0, "hidden_states"),
                    Placement(OUTPUT_ADAPTER, "layer.2.dropout", "layer.2", 0, "hidden_states"))),
)

# model_type -> where the sub-layers of its blocks are. Semantics follow AdapterHub (adapters 1.3), so that its
# checkpoints give its outputs.
PLACEMENTS: dict[str, tuple[BlockPlacement, ...]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    # ViT is pre-LN; its block applies one dropout module twice, so h is read at the attention / MLP outputs.
    "vit": (BlockPlacement(r"(.*\.)?(?:encoder\.layer|layers)\.\d+",
                           _pre_ln("attention", "layernorm_before", "mlp", "layernorm_after")),),
    "t5": _T5,
    "mt5": _T5,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": (BlockPlacement(r"(.*\.)?h\.\d+", _pre_ln("attn", "ln_1", "mlp", "ln_2")),),
}


def placements_from_names(
    block_pattern: str, sublayer_modules: dict[str, dict[str, Any]]
) -> tuple[BlockPlacement, ...]:
    """Placements for an architecture without a table entry: ``{location: {"h_module": ..., "x_module": ...,
    "x_arg": 0, "layer_norm": None}}`` with paths relative to the blocks that ``block_pattern`` matches."""
    subs = []
    for location, spec in sublayer_modules.items():
        if location not in LOCATIONS:
            raise ValueError(f"sublayer_modules: unknown location {location!r}; use one of {', '.join(LOCATIONS)}.")
        if not isinstance(spec, dict) or "h_module" not in spec or "x_module" not in spec:
            raise ValueError(
                f"sublayer_modules[{location!r}] must be a dict with 'h_module' (the module whose output is the "
                "sub-layer output) and 'x_module' (the module whose input is the residual), optionally 'x_arg' and "
                "'layer_norm' (post-LN models)."
            )
        unknown = set(spec) - {"h_module", "x_module", "x_arg", "x_kwarg", "layer_norm"}
        if unknown:
            raise ValueError(f"sublayer_modules[{location!r}]: unknown keys {sorted(unknown)}.")
        subs.append(Placement(location, spec["h_module"], spec["x_module"], int(spec.get("x_arg", 0)),
                              spec.get("x_kwarg"), spec.get("layer_norm")))
    return (BlockPlacement(block_pattern, tuple(subs)),)


def placements_for(model: nn.Module, block_pattern: Optional[str] = None,
                   sublayer_modules: Optional[dict] = None) -> tuple[BlockPlacement, ...]:
    """The placement table of ``model``: user-named modules first, then the table by ``config.model_type``."""
    if sublayer_modules:
        if not block_pattern:
            raise ValueError("sublayer_modules needs block_pattern too (a regex matching the blocks' full names, "
                             "e.g. r'model\\.layers\\.\\d+').")
        return placements_from_names(block_pattern, sublayer_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PLACEMENTS:
        return PLACEMENTS[model_type]
    known = ", ".join(sorted(PLACEMENTS))
    raise ValueError(
        f"Sub-layer adapters do not know where the sub-layers of model type {model_type!r} "
        f"({type(model).__name__}) are (known: {known}). Name them: set block_pattern (regex of the blocks' full "
        "module names, e.g. r'model\\.layers\\.\\d+') and sublayer_modules={'mh_adapter': {'h_module': "
        "'self_attn', 'x_module': 'input_layernorm'}, 'output_adapter': {'h_module': 'mlp', 'x_module': "
        "'post_attention_layernorm'}} (paths relative to a block; h_module's output is the sub-layer output, "
        "x_module's input is the residual; add 'layer_norm' for post-LN blocks)."
    )


def find_blocks(model: nn.Module, table: Sequence[BlockPlacement]) -> list[tuple[str, BlockPlacement]]:
    """(full name, placement) of every block of ``model`` that ``table`` describes, in model order."""
    found = []
    for name, module in model.named_modules():
        if not name or ".base_layer" in name:
            continue
        for bp in table:
            if re.fullmatch(bp.block_pattern, name):
                found.append((name, bp))
                break
    return found


def block_index(name: str) -> Optional[int]:
    m = re.search(r"\.(\d+)$", name)
    return int(m.group(1)) if m else None


class _SublayerHook:
    """A forward (pre-)hook of a sub-layer module that hands its call to the wrapping adapter layer: ``kind`` "x"
    records the residual input, "h" replaces the sub-layer output."""

    def __init__(self, layer: "SublayerAdapterLayer", loc: str, sub: "Placement", kind: str) -> None:
        self.layer, self.loc, self.sub, self.kind = layer, loc, sub, kind

    def __call__(self, module: nn.Module, args: tuple, *rest: Any) -> Any:
        if self.kind == "x":
            return self.layer._record_x(self.loc, self.sub, args, rest[0])
        return self.layer._replace_h(self.loc, rest[0])


class SublayerAdapterLayer(AdapterLayer):
    """Wraps one block; hosts adapters at its sub-layers through hooks (see the module docstring).

    Subclasses define ``adapter_slots`` (one container per location, :meth:`slot_for`) and
    :meth:`apply_sublayer`.
    """

    def __init__(self, base_layer: nn.Module, placement: BlockPlacement) -> None:
        super().__init__(base_layer)
        self.placement = placement
        self._x: dict[str, torch.Tensor] = {}
        self._sublayer_cache: dict[str, Placement] = {}
        self._ln_refs: dict[str, tuple[Optional[nn.Module]]] = {}
        for sub in placement.sublayers:
            self._resolve(base_layer, sub)  # fail early, naming the missing module
        for sub in placement.sublayers:
            self._install(sub)

    # -------------------------------------------------------------------------------------------- hooks
    @staticmethod
    def _resolve(block: nn.Module, sub: Placement) -> None:
        for what, path in (("h_module", sub.h_module), ("x_module", sub.x_module), ("layer_norm", sub.layer_norm)):
            if path:
                try:
                    block.get_submodule(path)
                except AttributeError:
                    children = ", ".join(n for n, _ in block.named_children())
                    raise ValueError(
                        f"{type(block).__name__} has no module {path!r} ({what} of the {sub.location}); its children "
                        f"are: {children}. Name the sub-layer modules with sublayer_modules=."
                    ) from None

    def _install(self, sub: Placement) -> None:
        block = self.base_layer
        x_mod = block.get_submodule(sub.x_module) if sub.x_module else block
        h_mod = block.get_submodule(sub.h_module)
        loc = sub.location

        # hooks are small objects (not closures over self), so that copy.deepcopy of the model gives hooks that
        # drive the copy's adapters, not the original's
        x_mod.register_forward_pre_hook(_SublayerHook(self, loc, sub, "x"), with_kwargs=True)
        h_mod.register_forward_hook(_SublayerHook(self, loc, sub, "h"))
        self._sublayer_cache[loc] = sub
        # a plain reference (a tuple, not a submodule: the LayerNorm stays the block's own parameter)
        self._ln_refs[loc] = (block.get_submodule(sub.layer_norm) if sub.layer_norm else None,)

    def _record_x(self, loc: str, sub: "Placement", args: tuple, kwargs: dict) -> None:
        if self._wants(loc):
            x = args[sub.x_arg] if len(args) > sub.x_arg else kwargs.get(sub.x_kwarg or "", None)
            self._x[loc] = x

    def _replace_h(self, loc: str, output: Any) -> Any:
        if not self._wants(loc):
            return None
        x = self._x.pop(loc, None)
        if isinstance(output, tuple):
            return (self._adapt(loc, output[0], x),) + output[1:]
        return self._adapt(loc, output, x)

    def on_unwrap(self) -> None:
        """Remove the hooks (called by the engine when this wrapper is taken out of the model)."""
        for module in self.base_layer.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key in [k for k, h in hooks.items() if isinstance(h, _SublayerHook) and h.layer is self]:
                    del hooks[key]
                    getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
        self._x.clear()

    def layer_norm(self, location: str) -> Optional[nn.Module]:
        return self._ln_refs[location][0]

    def _names_at(self, location: str) -> list[str]:
        slot = getattr(self, self.slot_for(location))
        return [n for n in self.active_adapters if n in slot and n in self.adapter_configs]

    def _wants(self, location: str) -> bool:
        if self.adapters_disabled or location not in self._sublayer_cache:
            return False
        slot = getattr(self, self.slot_for(location))
        if len(slot) == 0:
            return False
        if self.mixed_batch is not None:
            return True
        return bool(self._names_at(location))

    def _adapt(self, location: str, h: torch.Tensor, x: Optional[torch.Tensor]) -> torch.Tensor:
        ln = self.layer_norm(location)
        if self.mixed_batch is not None:
            batch = self.mixed_batch.for_rows(h.shape[0])
            slot = getattr(self, self.slot_for(location))
            out = h.clone()
            for name in batch.groups:
                if name == BASE_ADAPTER or name not in slot:
                    continue
                rows = batch.rows(name, h.device)
                out[rows] = self.apply_sublayer(name, location, h[rows], None if x is None else x[rows], ln)
            return out
        for name in self._names_at(location):
            h = self.apply_sublayer(name, location, h, x, ln)
        return h

    # ------------------------------------------------------------------------------------ method interface
    def slot_for(self, location: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_sublayer(self, adapter_name: str, location: str, h: torch.Tensor, x: Optional[torch.Tensor],
                       layer_norm: Optional[nn.Module]) -> torch.Tensor:  # pragma: no cover - abstract
        """Return ``h'``: the model continues with ``layer_norm(h' + x)`` (post-LN) or ``h' + x`` (pre-LN)."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_parameters", "_modules", "_buffers"):
                raise
            return getattr(self._modules["base_layer"], name)

    @property
    def weight(self) -> torch.Tensor:
        raise AttributeError(f"{type(self.base_layer).__name__} (a block) has no single weight.")

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        raise ValueError(
            "Sub-layer (bottleneck) adapters cannot be merged into the base weights: their non-linearity sits "
            "between two projections. Keep them unmerged (or use LoRA/(IA)3 when merging is needed)."
        )

    def first_nonfinite_merge(self, adapter_names: Sequence[str]) -> Optional[str]:
        self.merge(adapter_names)
        return None

    def unmerge(self) -> None:
        return None
