"""Quantised base layers (QLoRA and friends): bitsandbytes 4-bit / 8-bit linears and torchao-quantised linears.

An adapter on a quantised linear keeps the frozen quantised weight as it is: the base forward runs the quantised
kernel, the adapter's delta is computed beside it in float. The weight is dequantised only transiently (DoRA's
row norms, merging) and never kept as a full-precision copy.

Merging into a quantised base dequantises the weight, merges, and quantises the result again; the rounding error
this adds is logged and kept on the layer (``layer.quantized_merge_error[adapter]``, max absolute difference
between the merged float weight and its re-quantised value). torchao tensors cannot be re-quantised without the
config that made them, so merging into them is refused with a clear message.

Nothing here imports bitsandbytes or torchao: a layer is recognised only if its library is already imported
(which it is whenever such a layer exists).
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any, Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def _bnb():
    return sys.modules.get("bitsandbytes")


def backend(module: nn.Module) -> Optional[str]:
    """"bnb-4bit", "bnb-8bit", "torchao" for a quantised linear layer, else None."""
    bnb = _bnb()
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear4bit):
            return "bnb-4bit"
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "bnb-8bit"
    weight = getattr(module, "weight", None)
    if type(weight) is nn.Parameter or type(weight) is torch.Tensor:  # the common case; also traceable by dynamo
        return None
    if isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao"):
        return "torchao"
    return None


def is_quantized(module: nn.Module) -> bool:
    return backend(module) is not None


def is_quantized_weight(weight: torch.Tensor) -> bool:
    bnb = _bnb()
    if bnb is not None and isinstance(weight, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
        return True
    return type(weight).__module__.startswith("torchao") or not weight.dtype.is_floating_point


def linear_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of a quantised linear (its stored weight may be packed)."""
    if is_quantized(module) and hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return None


def weight_shape(module: nn.Module) -> torch.Size:
    """The logical shape of a layer's weight: (out, in) for a quantised linear (whose stored weight may be
    packed, e.g. bitsandbytes 4-bit keeps (out * in / 2, 1) bytes), else the weight's own shape."""
    features = linear_features(module)
    if features is not None:
        return torch.Size((features[1], features[0]))
    return module.weight.shape


def input_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype to give ``module`` its input in: its weight's for a plain float layer; ``default`` (the
    activations' dtype) for a quantised one, whose stored weight dtype (uint8, int8) is not a compute dtype."""
    weight = getattr(module, "weight", None)
    if weight is None or is_quantized(module) or not weight.dtype.is_floating_point:
        return default
    return weight.dtype


def dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight of a quantised linear as a new float tensor (a transient copy: not stored anywhere)."""
    kind = backend(module)
    weight = module.weight
    with torch.no_grad():
        if kind == "bnb-4bit" and getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacked the weight in place for its CPU inference kernel (eval mode, no grad); read
            # the weight back through that kernel: W^T = layer(I) - bias
            eye = torch.eye(module.in_features, dtype=weight.quant_state.dtype, device=weight.device)
            w = (module(eye) - (module.bias if module.bias is not None else 0)).t()
        elif kind == "bnb-4bit":
            w = _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)
        elif kind == "bnb-8bit":
            scb = getattr(weight, "SCB", None)
            if scb is None:  # after the first forward the row scales live in the layer's matmul state
                scb = getattr(getattr(module, "state", None), "SCB", None)
            if scb is None:  # not quantised yet (has_fp16_weights=True, or not moved to a device)
                w = weight.data
            else:
                w = weight.data.to(torch.float32) * (scb.to(torch.float32).view(-1, 1) / 127.0)
        elif kind == "torchao":
            w = weight.dequantize()
        else:
            w = weight.data
    return w.to(dtype)


def requantize(module: nn.Module, new_weight: torch.Tensor) -> None:
    """Replace the quantised weight of ``module`` by the quantisation of the float ``new_weight`` (out, in)."""
    kind = backend(module)
    bnb = _bnb()
    old = module.weight
    device = old.device
    if kind == "bnb-4bit":
        state = old.quant_state
        kwargs: dict[str, Any] = dict(requires_grad=False, quant_type=old.quant_type, blocksize=old.blocksize,
                                      compress_statistics=old.compress_statistics, quant_storage=old.quant_storage)
        if "module" in inspect.signature(bnb.nn.Params4bit.__new__).parameters:
            kwargs["module"] = module
        dtype = getattr(state, "dtype", None) or torch.float32
        param = bnb.nn.Params4bit(new_weight.to("cpu", dtype), **kwargs)
        module.weight = param._quantize(device) if device.type != "meta" else param
    elif kind == "bnb-8bit":
        param = bnb.nn.Int8Params(new_weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
        module.weight = param.to(device)
    else:
        raise ValueError(
            f"Cannot merge an adapter into a {kind} quantised weight ({type(old).__name__}): peftkit cannot "
            "re-quantise it without the torchao config that made it. Load the base model without quantisation, "
            "merge there (merge_and_unload), then quantise the merged model with torchao's quantize_."
        )


_BACKEND_NAMES = {"bnb-4bit": "bitsandbytes 4-bit", "bnb-8bit": "bitsandbytes 8-bit", "torchao": "torchao"}


def refusal_message(method: str, path: str, module: nn.Module) -> str:
    """Why ``method`` refuses the quantised layer ``module`` at ``path``, and what to do instead."""
    from peftkit.engine.registry import _REGISTRY

    kind = backend(module)
    detail = type(module).__name__
    if kind == "torchao":
        detail += f" with a {type(module.weight).__name__} weight"
    ok = sorted(k for k, spec in _REGISTRY.items() if spec.supports_quantized_base)
    return (
        f"{method} cannot adapt {path or 'the layer'}: it is a quantised layer ({detail}, {_BACKEND_NAMES[kind]}). "
        f"{method}'s update transforms the dense base weight, which peftkit never dequantises into a stored "
        f"full-precision copy. On quantised bases use one of {', '.join(ok)} (or a method that does not wrap "
        "linear layers: bottleneck adapters, prompt methods, LN tuning), or load the base model without quantisation."
    )


def check_mergeable(module: nn.Module, path: str = "") -> None:
    """Raise before anything changes if the quantised weight of ``module`` cannot be merged into."""
    kind = backend(module)
    if kind == "torchao":
        requantize(module, torch.empty(0))  # raises the message above


def merge_quantized(layer: nn.Module, adapter_name: str, unmerge: bool = False, safe_merge: bool = False) -> float:
    """Dequantise, merge (or unmerge) one adapter, re-quantise; return and record the re-quantisation error."""
    base = layer.get_base_layer()
    check_mergeable(base)
    with torch.no_grad():
        weight = dequantize(base)
        new = layer.unmerged_weight(adapter_name, weight) if unmerge else layer.merged_weight(adapter_name, weight)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(
                f"Merging adapter {adapter_name!r} would put NaN or inf into the base weights; nothing was changed."
            )
        requantize(base, new)
        error = (dequantize(base) - new).abs().max().item()
    errors = layer.__dict__.setdefault("quantized_merge_error", {})
    errors[adapter_name] = error
    logger.warning(
        "%s adapter %r into a %s base: the weight was dequantised, %s and quantised again; re-quantisation error "
        "(max abs) %.3g.", "Unmerged" if unmerge else "Merged", adapter_name, backend(base),
        "unmerged" if unmerge else "merged", error,
    )
    return error


# ------------------------------------------------------------------ bitsandbytes 4-bit base, dequantised in chunks
# bitsandbytes' own 4-bit matmul dequantises the whole weight in the forward and again in the backward (for the
# input's gradient): a full-precision (out, in) temporary per call, the largest single allocation of a QLoRA step
# on a model whose weights dominate. The adapter layers call the frozen 4-bit base through this function instead:
# the same result from the same quantised bytes, dequantised a few rows at a time (about 1 MiB at once), and
# nothing saved for the backward but a reference to the module (the weight is frozen: no input is kept for it).
CHUNK_BYTES = 1 << 20  # the dequantised rows held at once (1 MiB of float32 by default)


def _absmax(state) -> torch.Tensor:
    """The float32 per-block scales of a 4-bit quant state (double quantisation: dequantised, small)."""
    if getattr(state, "nested", False):
        absmax = _bnb().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return absmax.float()
    return state.absmax.float()


def _chunk_rows(out_f: int, in_f: int, blocksize: int, dtype: torch.dtype) -> Optional[int]:
    """Rows per chunk (the last chunk runs to the end), about CHUNK_BYTES of ``dtype``; None unless every row is
    whole 4-bit blocks (in_features a multiple of the blocksize, 64 by default: true of transformer widths)."""
    if in_f % blocksize:
        # blocks spanning rows: bitsandbytes' CPU kernel dequantises a slice starting mid-row wrongly (measured)
        return None
    rows = max(1, CHUNK_BYTES // (in_f * torch.finfo(dtype).bits // 8))
    return min(rows, out_f)


def _dequantized_rows(weight, state, absmax: torch.Tensor, r0: int, r1: int, dtype) -> torch.Tensor:
    """Rows ``r0:r1`` of the dequantised weight (a small transient: at most CHUNK_BYTES)."""
    in_f = state.shape[1]
    bs = state.blocksize
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.data.view(-1)[r0 * in_f // 2: r1 * in_f // 2], absmax[r0 * in_f // bs: -(-r1 * in_f // bs)],
        bs, state.quant_type, [r1 - r0, in_f], dtype)


class _Linear4bitChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, module, rows):  # type: ignore[override]
        weight = module.weight
        state = weight.quant_state
        out_f, in_f = state.shape
        absmax = _absmax(state)
        x2 = x.reshape(-1, in_f)
        out = torch.empty(x2.shape[0], out_f, dtype=x.dtype, device=x.device)
        for r0 in range(0, out_f, rows):
            r1 = min(r0 + rows, out_f)
            w = _dequantized_rows(weight, state, absmax, r0, r1, x.dtype)
            out[:, r0:r1].copy_(x2 @ w.t())
        if bias is not None:
            out.add_(bias.to(out.dtype))
        ctx.module, ctx.rows, ctx.x_shape, ctx.has_bias = module, rows, x.shape, bias is not None
        return out.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        module, rows = ctx.module, ctx.rows
        weight = module.weight
        state = weight.quant_state
        out_f, in_f = state.shape
        g = grad_out.reshape(-1, out_f)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            absmax = _absmax(state)
            grad_x = torch.zeros(g.shape[0], in_f, dtype=g.dtype, device=g.device)
            for r0 in range(0, out_f, rows):
                r1 = min(r0 + rows, out_f)
                grad_x.addmm_(g[:, r0:r1], _dequantized_rows(weight, state, absmax, r0, r1, g.dtype))
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = g.sum(0)
        return grad_x, grad_bias, None, None


def _chunkable(module: nn.Module, x: torch.Tensor) -> Optional[int]:
    """Rows per chunk if ``module`` is a plain bitsandbytes 4-bit linear that :func:`base_forward` may compute
    (no hooks, no CPU inference repacking, a float input), else None."""
    bnb = _bnb()
    if bnb is None or type(module).forward is not bnb.nn.Linear4bit.forward or not isinstance(module, bnb.nn.Linear4bit):
        return None
    if module._forward_hooks or module._forward_pre_hooks or not x.is_floating_point() or x.dim() < 1:
        return None
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
        return None
    if module.training is False and not torch.is_grad_enabled():
        return None  # inference: bitsandbytes' own kernels (fused 4-bit GEMV) are the better choice
    if torch.compiler.is_compiling() or not hasattr(torch.ops.bitsandbytes, "dequantize_4bit"):
        return None
    dtype = module.compute_dtype or x.dtype
    return _chunk_rows(state.shape[0], state.shape[1], state.blocksize, dtype)


def base_forward(module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``module(x)`` for the frozen base of an adapter layer; a bitsandbytes 4-bit base in training is computed
    by :class:`_Linear4bitChunked` (same output, no full dequantised weight at any time)."""
    rows = None if args or kwargs else _chunkable(module, x)
    if rows is None:
        return module(x, *args, **kwargs)
    inp_dtype = x.dtype
    dtype = module.compute_dtype or x.dtype
    bias = module.bias
    bias = None if bias is None else bias.to(dtype)
    return _Linear4bitChunked.apply(x.to(dtype), bias, module, rows).to(inp_dtype)


# ----------------------------------------------------------------------------------------- training setup
def _quantized_model(model: nn.Module) -> bool:
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    if getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(is_quantized(m) for m in model.modules())


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: Optional[dict] = None
) -> nn.Module:
    """Get a quantised base model ready for adapter training (Hugging Face PEFT's function of the same name and
    meaning): freeze every parameter, keep the non-quantised half-precision ones (norms, embeddings, head) in
    float32 for stable training, and, on a quantised model, turn gradient checkpointing on; with the reentrant
    variant (the default) the input embeddings' output is made to require grad so that gradients reach the
    adapters through checkpointed blocks whose inputs would otherwise need no grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    torchao_model = any(backend(m) == "torchao" for m in model.modules())
    if not torchao_model:  # torchao tensors report their original dtype: leave them alone
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and not is_quantized_weight(p):
                p.data = p.data.to(torch.float32)
    kwargs = dict(gradient_checkpointing_kwargs or {})
    kwargs.setdefault("use_reentrant", True)  # PEFT's default; torch wants it said explicitly
    if use_gradient_checkpointing and _quantized_model(model):
        if kwargs["use_reentrant"]:
            enable_input_require_grads(model)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ValueError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); pass use_gradient_checkpointing=False "
                "and checkpoint its blocks yourself."
            )
        if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
            enable(gradient_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - old transformers
            enable()
    return model


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (needed by reentrant checkpointing with a frozen embedding)."""
    fn = getattr(model, "enable_input_require_grads", None)
    if callable(fn):
        fn()
        return
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(); cannot make its inputs require grad.")
    emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


__all__ = ["backend", "base_forward", "dequantize", "enable_input_require_grads", "input_dtype", "is_quantized", "merge_quantized",
           "prepare_model_for_kbit_training", "requantize", "weight_shape"]
