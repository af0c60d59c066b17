"""The fused LoRA / DoRA autograd nodes and the stacked mixed-adapter path against straightforward implementations.

Outputs and gradients (input, factors, magnitude, bias) are compared in float32 on CPU with tight tolerances, for
both strategies of the fused node (factored products, transient merged weight); in bfloat16 on a GPU when one is
present. No timing here: speed lives in benchmarks/speed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import MODELS

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora import lora_ops
from peftkit.methods.lora.lora import Linear as LoraLinear

STRATEGIES = [False, True]  # merged=False: factored products; merged=True: transient W + sBA


def _rand(*shape, seed, dtype=torch.float32, device="cpu", requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _close(a, b, rtol, atol, what):
    assert a is not None and b is not None, what
    err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
    assert err <= rtol or torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol), f"{what}: rel err {err:.3g}"


def _lora_reference(x, w, bias, factors, fan_in_fan_out, masks, keep):
    """Plain autograd composition: y = x W^T + b + sum_i s_i (x_d A^T) B^T in x's dtype."""
    wo = w.t() if fan_in_fan_out else w
    y = F.linear(x, wo, bias)
    for (a, b, s), m, k in zip(factors, masks, keep):
        xd = x if m is None else x * m / k
        y = y + F.linear(F.linear(xd, a.to(x.dtype)), b.to(x.dtype)) * s
    return y


def _grads(out, inputs, seed):
    g = _rand(*out.shape, seed=seed, dtype=out.dtype, device=out.device, requires_grad=False)
    return torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], g)


@pytest.mark.parametrize("merged", STRATEGIES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_node_matches_reference(merged, fan_in_fan_out, with_bias):
    in_f, out_f = 24, 20
    x = _rand(3, 7, in_f, seed=1)
    w = _rand(*((in_f, out_f) if fan_in_fan_out else (out_f, in_f)), seed=2, requires_grad=False)
    bias = _rand(out_f, seed=3) if with_bias else None  # a trainable bias (bias="all")
    factors = [(_rand(4, in_f, seed=4), _rand(out_f, 4, seed=5), 0.5), (_rand(2, in_f, seed=6), _rand(out_f, 2, seed=7), 2.0)]
    params = [x, bias] + [t for a, b, _ in factors for t in (a, b)]
    y = lora_ops.lora_linear(x, w, bias, factors, fan_in_fan_out, merged=merged)
    ref = _lora_reference(x, w, bias, factors, fan_in_fan_out, [None, None], [1.0, 1.0])
    _close(y, ref, 1e-6, 1e-6, "output")
    for got, exp, name in zip(_grads(y, params, 9), _grads(ref, params, 9), ["x", "bias", "A0", "B0", "A1", "B1"][0 if with_bias else 0:]):
        _close(got, exp, 1e-5, 1e-6, f"grad {name}")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_dims,scaling", [(2, 1.0), (3, 0.75), (4, 2.0)])
@pytest.mark.parametrize("needs", ["all", "factors-only", "x-and-B"])
def test_single_adapter_node_matches_reference(fan_in_fan_out, with_bias, x_dims, scaling, needs):
    """One adapter without dropout takes the trimmed node (_LoraOneFn); every gradient any caller may ask for
    (input, bias, A, B, in any subset) must equal plain autograd's."""
    in_f, out_f = 24, 20
    lead = {2: (9,), 3: (3, 7), 4: (2, 3, 5)}[x_dims]
    x = _rand(*lead, in_f, seed=1, requires_grad=needs != "factors-only")
    w = _rand(*((in_f, out_f) if fan_in_fan_out else (out_f, in_f)), seed=2, requires_grad=False)
    bias = _rand(out_f, seed=3) if with_bias else None
    a = _rand(4, in_f, seed=4, requires_grad=needs != "x-and-B")
    b = _rand(out_f, 4, seed=5)
    y = lora_ops.lora_linear(x, w, bias, [(a, b, scaling)], fan_in_fan_out)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_LoraOneFnBackward"
    ref = _lora_reference(x, w, bias, [(a, b, scaling)], fan_in_fan_out, [None], [1.0])
    _close(y, ref, 1e-6, 1e-6, "output")
    params = [t for t in (x, bias, a, b) if t is not None and t.requires_grad]
    for got, exp, name in zip(_grads(y, params, 9), _grads(ref, params, 9), range(len(params))):
        _close(got, exp, 1e-5, 1e-6, f"grad {name}")
        assert got.shape == exp.shape


def test_lora_node_with_dropout_uses_one_mask_per_adapter():
    in_f, out_f = 16, 12
    x = _rand(2, 5, in_f, seed=1)
    w = _rand(out_f, in_f, seed=2, requires_grad=False)
    factors = [(_rand(3, in_f, seed=4), _rand(out_f, 3, seed=5), 1.5), (_rand(2, in_f, seed=6), _rand(out_f, 2, seed=7), 0.5)]
    ps = [0.3, 0.0]
    torch.manual_seed(11)
    y = lora_ops.lora_linear(x, w, None, factors, dropout_p=ps)
    torch.manual_seed(11)
    masks = [lora_ops.dropout_mask(x, p) if p > 0 else None for p in ps]  # the same draws, in the same order
    assert 0 < masks[0].float().mean() < 1
    ref = _lora_reference(x, w, None, factors, False, masks, [1 - p for p in ps])
    _close(y, ref, 1e-6, 1e-6, "output")
    params = [x] + [t for a, b, _ in factors for t in (a, b)]
    for got, exp in zip(_grads(y, params, 3), _grads(ref, params, 3)):
        _close(got, exp, 1e-5, 1e-6, "grad")
    with pytest.raises(ValueError, match="dropout"):
        lora_ops.lora_linear(x, w, None, factors, dropout_p=ps, merged=True)


def test_lora_node_frozen_weight_gets_no_grad_and_casts_fp32_factors_down():
    x = _rand(4, 8, seed=1, dtype=torch.float64)
    w = _rand(6, 8, seed=2, dtype=torch.float64, requires_grad=False)
    a, b = _rand(2, 8, seed=3), _rand(6, 2, seed=4)  # float32 master weights, float64 input
    y = lora_ops.lora_linear(x, w, None, [(a, b, 1.0)])
    assert y.dtype == torch.float64  # computed in the input's dtype
    y.sum().backward()
    assert w.grad is None and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


@pytest.mark.parametrize("merged", STRATEGIES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dora_node_matches_reference(merged, fan_in_fan_out, with_bias):
    in_f, out_f, r, s = 24, 20, 4, 0.75
    x = _rand(3, 7, in_f, seed=1)
    w = _rand(*((in_f, out_f) if fan_in_fan_out else (out_f, in_f)), seed=2, requires_grad=False)
    wo = w.t() if fan_in_fan_out else w
    bias = _rand(out_f, seed=3, requires_grad=False) if with_bias else None
    a, b = _rand(r, in_f, seed=4), _rand(out_f, r, seed=5)
    m = (_rand(out_f, seed=6, requires_grad=False).abs() + 0.5).requires_grad_(True)
    w_sq = wo.float().square().sum(1)
    y = lora_ops.dora_linear_fused(x, w, bias, w_sq, a, b, m, s, fan_in_fan_out, merged=merged)
    result = F.linear(x, wo, bias)
    ref = lora_ops.dora_linear(result, x, wo, bias, a, b, m, s)
    _close(y, ref, 1e-6, 1e-6, "output")
    params = [x, a, b, m]
    for got, exp, name in zip(_grads(y, params, 9), _grads(ref, params, 9), "x A B m".split()):
        _close(got, exp, 1e-5, 1e-6, f"grad {name}")


def test_dora_norm_from_factors_matches_explicit_norm():
    w, a, b = _rand(30, 40, seed=1), _rand(5, 40, seed=2), _rand(30, 5, seed=3)
    got = lora_ops.dora_norm_from_factors(w.square().sum(1), w, a, b, 0.3)
    exp = (w + 0.3 * b @ a).norm(dim=1)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ through the model
def _model(model: str, **kw):
    base = MODELS[model].build()
    return base, get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw))


def _force_reference(model, monkeypatch):
    monkeypatch.setattr(LoraLinear, "_decline_reason", lambda self, x, names: "forced by test")


def _paths(model) -> set[str]:
    return {m.fast_path for m in model.modules() if isinstance(m, LoraLinear)}


CASES = [
    ("llama", dict(r=4, target_modules="all-linear"), "fused-lora"),
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), "fused-dora"),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), "fused-lora"),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True), "fused-dora"),
    ("bert", dict(r=4, target_modules=["query", "value", "dense"], bias="all"), "fused-lora"),
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.2), "fused-lora"),
]


# every case with the default (factored) strategy; the merged strategy on one plain and one Conv1D/DoRA model
MODEL_RUNS = [(c, "factored") for c in CASES] + [(CASES[0], "merged"), (CASES[3], "merged")]


@pytest.mark.parametrize("case,merged", MODEL_RUNS, ids=[f"{c[0]}-{c[2]}-{m}" for c, m in MODEL_RUNS])
def test_model_fast_path_equals_reference_path(case, merged, monkeypatch):
    """The same model, once through the fused nodes and once through the plain per-adapter path: same loss,
    same gradient for every trainable parameter (dropout models are compared in eval mode for the output and in
    training mode with the fused node's own masks elsewhere)."""
    model_name, kw, path = case
    monkeypatch.setenv("PEFTKIT_LORA_PATH", merged)
    spec = MODELS[model_name]
    _, model = _model(model_name, **kw)
    model.train(False)
    inputs = spec.inputs(2)
    ref_model = copy.deepcopy(model)
    loss = spec.loss(model, inputs)
    loss.backward()
    assert _paths(model) == {path}
    _force_reference(ref_model, monkeypatch)
    ref_loss = spec.loss(ref_model, inputs)
    ref_loss.backward()
    assert _paths(ref_model) == {"reference: forced by test"}
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_params = dict(ref_model.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            n += 1
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert n > 0


def test_dropout_in_training_uses_fused_path_and_trains():
    _, model = _model("llama", r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    model.train()
    inputs = MODELS["llama"].inputs(2)
    loss = MODELS["llama"].loss(model, inputs)
    loss.backward()
    assert _paths(model) == {"fused-lora"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)


def test_declines_visibly():
    _, model = _model("llama", r=4, target_modules=["q_proj"], use_dora=True, lora_dropout=0.1)
    model.train()
    MODELS["llama"].loss(model, MODELS["llama"].inputs(2)).backward()
    assert _paths(model) == {"reference: DoRA with dropout"}
    _, model = _model("llama", r=4, target_modules=["q_proj"])
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.get_base_layer().weight.requires_grad_(True)
    MODELS["llama"].loss(model, MODELS["llama"].inputs(2)).backward()
    assert _paths(model) == {"reference: the base weight is trainable"}


def test_several_active_adapters_fused_equals_sequential(monkeypatch):
    base = MODELS["llama"].build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=7, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    inputs = MODELS["llama"].inputs(2)
    ref = copy.deepcopy(model)
    out = model(**inputs).logits
    assert _paths(model) == {"fused-lora"}
    _force_reference(ref, monkeypatch)
    torch.testing.assert_close(out, ref(**inputs).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- mixed batches
@pytest.mark.parametrize("n_adapters", [3, 8])
def test_mixed_batch_equals_per_row_single_adapter(n_adapters):
    base = MODELS["llama"].build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    names = ["default"]
    for i in range(1, n_adapters):
        cfg = LoraConfig(r=2 + i % 3, lora_alpha=3 + i, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                         init_lora_weights=False)
        model.add_adapter(f"a{i}", cfg)
        names.append(f"a{i}")
    rows = names + ["__base__", names[-1], names[0]]
    ids = torch.randint(0, 96, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=rows).logits
        assert "stacked-mixed" in _paths(model)
        for i, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    exp = model(input_ids=ids[i:i + 1]).logits
            else:
                model.set_adapter(name)
                exp = model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], exp, rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")
        # a second call reuses the cached stacks; changing a weight must invalidate them
        for m in model.modules():
            if isinstance(m, LoraLinear) and names[-1] in m.lora_B:
                m.lora_B[names[-1]].weight.add_(1.0)
        model.set_adapter(names[-1])
        exp = model(input_ids=ids[-2:-1]).logits
        again = model(input_ids=ids, adapter_names=rows).logits
        torch.testing.assert_close(again[-2:-1], exp, rtol=1e-5, atol=1e-5)


def test_mixed_batch_gradients_match_per_row():
    base = MODELS["llama"].build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    model.base_model.set_adapter(["default", "b"])  # both trainable
    model(input_ids=ids, adapter_names=["default", "b"], labels=ids).logits.sum().backward()
    ref.base_model.set_adapter(["default", "b"])
    total = 0
    for i, name in enumerate(["default", "b"]):
        ref.base_model.set_adapter([name])
        ref.base_model.model.requires_grad_(False)
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        total = total + ref(input_ids=ids[i:i + 1]).logits.sum()
    total.backward()
    refp = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.grad, refp[n].grad, rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------------------------------------------------ GPU bf16
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("merged", STRATEGIES)
def test_bf16_cuda_nodes_match_fp64_reference(merged):
    """bf16 compute with float32 master factors vs a float64 reference: relative error of bf16 size."""
    dev, dt = "cuda", torch.bfloat16
    in_f, out_f, r = 512, 384, 16
    x = _rand(4, 64, in_f, seed=1, dtype=dt, device=dev)
    w = (_rand(out_f, in_f, seed=2, device=dev, requires_grad=False) * 0.05).to(dt)
    a = (_rand(r, in_f, seed=3, device=dev, requires_grad=False) * 0.05).requires_grad_()
    b = (_rand(out_f, r, seed=4, device=dev, requires_grad=False) * 0.05).requires_grad_()
    m = (w.float().norm(dim=1) * 1.1).requires_grad_()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, b, m)]
    x64, a64, b64, m64 = leaves64
    w64 = w.double()

    y = lora_ops.lora_linear(x, w, None, [(a, b, 2.0)], merged=merged)
    ref = _lora_reference(x64, w64, None, [(a64, b64, 2.0)], False, [None], [1.0])
    _close(y, ref, 1e-2, 1e-2, "lora output")
    for got, exp, name in zip(_grads(y, [x, a, b], 5), _grads(ref, [x64, a64, b64], 5), "x A B".split()):
        _close(got, exp.to(got.dtype), 2e-2, 1e-2, f"lora grad {name}")

    y = lora_ops.dora_linear_fused(x, w, None, w.float().square().sum(1), a, b, m, 2.0, merged=merged)
    ref = lora_ops.dora_linear(F.linear(x64, w64), x64, w64, None, a64, b64, m64, 2.0)
    _close(y, ref, 1e-2, 1e-2, "dora output")
    for got, exp, name in zip(_grads(y, [x, a, b, m], 6), _grads(ref, leaves64, 6), "x A B m".split()):
        _close(got, exp.to(got.dtype), 2e-2, 1e-2, f"dora grad {name}")


def test_strategy_choice_env(monkeypatch):
    monkeypatch.delenv("PEFTKIT_LORA_PATH", raising=False)
    assert not lora_ops.choose_merged(10_000, 64, 64)  # factored unless asked
    monkeypatch.setenv("PEFTKIT_LORA_PATH", "auto")
    assert lora_ops.choose_merged(10_000, 64, 64) and not lora_ops.choose_merged(8, 4096, 4096)
    assert lora_ops.choose_merged(2048, 2048, 2048, backward=False)
    monkeypatch.setenv("PEFTKIT_LORA_PATH", "fast")
    with pytest.raises(ValueError, match="factored"):
        lora_ops.choose_merged(1, 1, 1)
