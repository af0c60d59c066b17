"""The contract every layer-wrapping method must meet, as one parametrised suite.

A method's test module lists its cases and calls ``contract_tests(CASES)``; the returned test functions are put
into the module's namespace so pytest collects them:

    CASES = [Case("lora-llama", "llama", lambda: LoraConfig(r=4, target_modules=["q_proj"]),
                  ref=lambda peft: peft.LoraConfig(r=4, target_modules=["q_proj"]))]
    globals().update(contract_tests(CASES))

Checks: identity at init (when the method's init is an identity), only adapter parameters train, merged output
= unmerged output, unmerge restores the base weights, disable gives the base output, save/load reproduces
outputs exactly, outputs equal Hugging Face PEFT's given the same weights (checkpoints moved both ways through
files), and a few optimiser steps lower the loss.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch

from models import MODELS

import peftkit


@dataclass
class Case:
    id: str
    model: str
    config: Callable[[], Any]  # -> peftkit config
    ref: Optional[Callable[[Any], Any]] = None  # peft module -> peft config with the same meaning
    identity_init: bool = True
    mergeable: bool = True
    perturb: Optional[Callable[[torch.nn.Module], None]] = None  # make the adapter non-trivial
    atol: float = 1e-5
    train_lr: float = 1e-2
    train_steps: int = 8
    extra: dict = field(default_factory=dict)


def _perturb_default(model: torch.nn.Module) -> None:
    """Add noise to the adapter's own parameters (names with the method's prefix, e.g. ``lora_``)."""
    peft_type = next(iter(model.peft_config.values())).peft_type
    prefix = peftkit.engine.registry.get_method(str(getattr(peft_type, "value", peft_type))).prefix
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and prefix in name and ".modules_to_save." not in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.1)


def build(case: Case):
    spec = MODELS[case.model]
    base = spec.build()
    peft_model = peftkit.get_peft_model(copy.deepcopy(base), case.config())
    return spec, base, peft_model


def perturb(case: Case, model: torch.nn.Module) -> None:
    (case.perturb or _perturb_default)(model)


def _out(spec, model, batch=3, **kw):
    """The model's output tensor on ``batch`` example inputs, without gradients (``kw``: e.g. adapter_names)."""
    with torch.no_grad():
        return spec.output(model(**spec.inputs(batch), **kw))


def noise_adapter(model, adapter, seed, scale=0.3):
    """Make LoRA adapter ``adapter`` non-trivial (its factors and its modules_to_save copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{adapter}." in n and ("lora_" in n or ".modules_to_save." in n):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _close(a, b, atol, what):
    diff = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert diff <= atol * scale, f"{what}: max abs difference {diff:.3g} > {atol * scale:.3g}"


def contract_tests(cases: list[Case]) -> dict[str, Callable]:
    params = [pytest.param(c, id=c.id) for c in cases]
    mark = pytest.mark.parametrize("case", params)

    @mark
    def test_identity_at_init(case: Case):
        if not case.identity_init:
            pytest.skip("this configuration does not initialise to the identity")
        spec, base, model = build(case)
        _close(_out(spec, model.eval()), _out(spec, base), 1e-6, "fresh adapter changed the output")

    @mark
    def test_only_adapter_parameters_train(case: Case):
        spec, base, model = build(case)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable, "no trainable parameters"
        prefix = peftkit.engine.registry.get_method(model.peft_type).prefix
        for n in trainable:
            short = n[len("base_model.model."):]
            assert prefix in n or ".modules_to_save." in n or (short.endswith("bias") and model.peft_config["default"].bias != "none"), n
        frozen_base = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen_base

    @mark
    def test_merge_unmerge_disable(case: Case):
        if not case.mergeable:
            pytest.skip("this method does not merge")
        spec, base, model = build(case)
        model.eval()
        perturb(case, model)
        before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
        unmerged = _out(spec, model)
        base_out = _out(spec, base)
        assert (unmerged - base_out).abs().max() > 1e-4, "perturbed adapter has no effect"
        model.merge_adapter()
        _close(_out(spec, model), unmerged, max(case.atol, 1e-4), "merged != unmerged")
        model.unmerge_adapter()
        for n, p in model.get_base_model().named_parameters():
            _close(p.detach(), before[n], 1e-5, f"unmerge did not restore {n}")
        _close(_out(spec, model), unmerged, max(case.atol, 1e-4), "output after unmerge")
        with model.disable_adapter():
            _close(_out(spec, model), base_out, 1e-5, "disabled adapter != base")
        merged_model = copy.deepcopy(model).merge_and_unload()
        assert not any(isinstance(m, peftkit.engine.layer.AdapterLayer) for m in merged_model.modules())
        _close(_out(spec, merged_model), unmerged, max(case.atol, 1e-4), "merge_and_unload output")

    @mark
    def test_save_load_exact(case: Case, tmp_path):
        spec, base, model = build(case)
        model.eval()
        perturb(case, model)
        expected = _out(spec, model)
        model.save_pretrained(tmp_path)
        assert os.path.isfile(tmp_path / "adapter_model.safetensors")
        assert os.path.isfile(tmp_path / "adapter_config.json")
        loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert torch.equal(_out(spec, loaded), expected), "save/load changed the output"
        assert not any(p.requires_grad for p in loaded.parameters())
        trainable = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
        assert any(p.requires_grad for p in trainable.parameters())

    @mark
    def test_parity_with_peft_both_ways(case: Case, tmp_path):
        if case.ref is None:
            pytest.skip("Hugging Face PEFT has no equivalent of this configuration")
        peft = pytest.importorskip("peft")
        spec, base, ours = build(case)
        ours.eval()
        perturb(case, ours)
        expected = _out(spec, ours)
        # ours -> peft
        ours.save_pretrained(tmp_path / "ours")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
        _close(_out(spec, theirs), expected, case.atol, "peft loading our checkpoint")
        # peft -> ours: a peft model with its own (perturbed) weights
        torch.manual_seed(7)
        ref_model = peft.get_peft_model(copy.deepcopy(base), case.ref(peft)).eval()
        perturb(case, ref_model)
        ref_out = _out(spec, ref_model)
        ref_model.save_pretrained(str(tmp_path / "theirs"))
        back = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
        _close(_out(spec, back), ref_out, case.atol, "our model loading peft's checkpoint")

    @mark
    def test_loss_decreases(case: Case):
        spec, base, model = build(case)
        model.train()
        kw = spec.inputs(4)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=case.train_lr)
        losses = []
        for _ in range(case.train_steps):
            loss = spec.loss(model, kw)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 1e-3, f"loss did not decrease: {losses}"

    return {
        "test_identity_at_init": test_identity_at_init,
        "test_only_adapter_parameters_train": test_only_adapter_parameters_train,
        "test_merge_unmerge_disable": test_merge_unmerge_disable,
        "test_save_load_exact": test_save_load_exact,
        "test_parity_with_peft_both_ways": test_parity_with_peft_both_ways,
        "test_loss_decreases": test_loss_decreases,
    }
