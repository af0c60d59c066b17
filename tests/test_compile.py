"""torch.compile(model, fullgraph=True): one graph (a graph break raises), no recompilation on later calls or after
optimiser steps (``error_on_recompile``), outputs and gradients equal to eager.

The default run traces with the ``aot_eager`` backend (dynamo + AOTAutograd: the graph capture, the guards and the
autograd graph are the same as with inductor, without its C++ code generation, which takes tens of seconds on a
small CPU). ``-m slow`` runs the default inductor backend for every method, convolutions, and every method on a
transformers model.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftkit
from models import MODELS

dynamo = pytest.importorskip("torch._dynamo")

LINEAR = ["lin0", "lin1"]
LLAMA = ["q_proj", "v_proj", "down_proj"]

CONFIGS = {
    "lora": lambda t: peftkit.LoraConfig(r=4, target_modules=t, init_lora_weights=False),
    "lora-two-adapters": lambda t: peftkit.LoraConfig(r=4, target_modules=t, init_lora_weights=False),
    "dora": lambda t: peftkit.LoraConfig(r=4, target_modules=t, use_dora=True),
    "loha": lambda t: peftkit.LoHaConfig(r=4, target_modules=t, init_weights=False),
    "lokr": lambda t: peftkit.LoKrConfig(r=4, target_modules=t, init_weights=False),
    "oft": lambda t: peftkit.OFTConfig(r=0, oft_block_size=4, target_modules=t, init_weights=False),
    "boft": lambda t: peftkit.BOFTConfig(boft_block_size=4, target_modules=t, init_weights=False),
    "hra": lambda t: peftkit.HRAConfig(r=4, target_modules=t, init_weights=False),
    "miss": lambda t: peftkit.MissConfig(r=4, target_modules=t, init_weights=False),
    "adalora": lambda t: peftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=t,
                                               init_lora_weights=False),
    "ia3": lambda t: peftkit.IA3Config(target_modules=t, feedforward_modules=t[-1:]),
    "bitfit": lambda t: peftkit.BitFitConfig(target_modules=t),
}


@pytest.fixture
def no_recompiles():
    dynamo.reset()
    with dynamo.config.patch(error_on_recompile=True):
        yield
    dynamo.reset()


def _build(model_name, method, targets):
    spec = MODELS[model_name]
    model = peftkit.get_peft_model(spec.build(), CONFIGS[method](targets))
    if method == "lora-two-adapters":
        model.add_adapter("other", CONFIGS["lora"](targets))
        model.set_adapter(["default", "other"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return spec, model.train()


def _check(model_name, method, targets, backend):
    spec, model = _build(model_name, method, targets)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    opt_c = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt_e = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):  # the second and third calls (after an optimiser step) must reuse the graph
        kw = spec.inputs(2)
        out = spec.output(compiled(**kw))
        ref = spec.output(eager(**kw))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4, msg=f"{method}: output differs at call {step}")
        out.float().pow(2).mean().backward()
        ref.float().pow(2).mean().backward()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            if p.requires_grad:
                assert p.grad is not None, f"{method}: no gradient for {name} through the compiled graph"
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=f"{method}: grad of {name}")
        opt_c.step(); opt_e.step(); opt_c.zero_grad(); opt_e.zero_grad()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_compiles_to_one_graph_without_recompiles(method, no_recompiles):
    _check("mlp", method, LINEAR, "aot_eager")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_compiles_a_transformers_model(method, no_recompiles):
    _check("llama", method, LLAMA, "aot_eager")


@pytest.mark.slow  # ~20 s of C++ code generation on a small CPU
def test_compiles_with_inductor(no_recompiles):
    _check("mlp", "lora", LINEAR, "inductor")


def test_eager_still_reports_the_fast_path():
    spec, model = _build("mlp", "dora", LINEAR)
    model(**spec.inputs(2)).sum().backward()
    layer = model.base_model.model.lin0
    assert layer.fast_path == "fused-dora"


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_compiles_with_inductor_every_method(method, no_recompiles):
    _check("mlp", method, LINEAR, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "oft"])
def test_compiles_convolutions(method, no_recompiles):
    _check("cnn", method, ["conv1", "lin"], "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(CONFIGS) - {"lora", "dora", "boft", "hra", "miss", "bitfit"}))  # Llama has no biases
def test_compiles_a_transformers_model_every_method(method, no_recompiles):
    _check("llama", method, LLAMA, "aot_eager")
