"""LoRA layers keep (norm, norm input) instead of a normalisation's output and recompute it in backward
(peftkit.methods.lora.input_recompute): same gradients, the output is not kept, hooks removed on unload."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from models import MODELS

import peftkit
from peftkit.methods.lora import input_recompute as ir

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(monkeypatch=None):
    """LoRA on a model the library treats as quantized (the recompute is applied on quantized bases only; the
    mechanism is the same on any base, so a float model marked quantized tests it exactly)."""
    from peftkit.integrations import quantization as quant

    real = quant._quantized_model
    quant._quantized_model = lambda m: True
    try:
        model = peftkit.get_peft_model(copy.deepcopy(MODELS["llama"].build()),
                                       peftkit.LoraConfig(r=4, target_modules=ALL, init_lora_weights=False))
    finally:
        quant._quantized_model = real
    return model.train()


def test_applied_on_quantized_bases_only():
    plain = peftkit.get_peft_model(copy.deepcopy(MODELS["llama"].build()), peftkit.LoraConfig(r=4, target_modules=ALL))
    assert not any(ir._tag in m._forward_hooks.values() for m in plain.modules())
    norms = [m for m in _model().modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(ir._tag in m._forward_hooks.values() for m in norms)


def _grads(model):
    model.zero_grad()
    inputs = MODELS["llama"].inputs(2)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_recomputed_inputs_give_the_same_gradients(monkeypatch):
    model = _model()
    calls = []
    value = ir._Recompute.value
    monkeypatch.setattr(ir._Recompute, "value", lambda self: (calls.append(1), value(self))[1])
    with_recompute = _grads(model)
    assert calls, "no LoRA input was recomputed"
    ir.untag_norm_outputs(model)
    calls.clear()
    plain = _grads(model)
    assert not calls
    assert with_recompute.keys() == plain.keys()
    assert all(torch.equal(with_recompute[n], plain[n]) for n in plain)


def test_the_norm_output_is_not_kept_after_forward():
    model = _model()
    norm = model.base_model.model.model.layers[1].input_layernorm
    refs = []
    norm.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
    inputs = MODELS["llama"].inputs(2)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    gc.collect()
    assert refs and refs[0]() is None, "the LoRA layers keep the norm's output alive"
    loss.backward()
    ir.untag_norm_outputs(model)
    refs.clear()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    gc.collect()
    assert refs[0]() is not None  # without recompute the layers save it (the check above is not vacuous)


def test_in_place_change_between_forward_and_backward_is_an_error():
    model = _model()
    norm = model.base_model.model.model.layers[1].post_attention_layernorm
    inputs = MODELS["llama"].inputs(2)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    with torch.no_grad():
        norm.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_unload_removes_the_hooks():
    model = _model()
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(ir._tag in m._forward_hooks.values() for m in norms)
    base = model.unload()
    assert not any(ir._tag in m._forward_hooks.values() for m in base.modules())
