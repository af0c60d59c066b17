"""Issue 17: init_lora_weights='loftq' (our CPU fake-quant LoftQ), 'eva' / 'corda' (clear errors), and
AdaLoraConfig as a subclass of LoraConfig, against PEFT where PEFT runs here."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.methods.lora.loftq import NF4_LEVELS, LoftQConfig, fake_quantize_int8, fake_quantize_nf4, loftq_factors

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(64, 48)
        self.lin1 = nn.Linear(48, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def test_nf4_levels_are_normal_quantiles():
    # QLoRA's construction: quantiles of N(0, 1), 8 positive and 7 negative levels plus an exact zero, scaled to 1
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.sort(torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])).values
    levels = levels / levels.abs().max()
    torch.testing.assert_close(levels.float(), torch.tensor(NF4_LEVELS), atol=1e-4, rtol=0)


def test_fake_quantizers():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    q4 = fake_quantize_nf4(w)
    blocks, qb = w.reshape(-1, 64), q4.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    codes = qb / absmax  # every value is a level times its block's absmax, the nearest one
    levels = torch.tensor(NF4_LEVELS)
    assert ((codes.unsqueeze(-1) - levels).abs().min(-1).values < 1e-5).all()
    nearest = levels[((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1)]
    torch.testing.assert_close(codes, nearest, atol=1e-5, rtol=0)
    q8 = fake_quantize_int8(w)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q8 - w).abs() <= step / 2 + 1e-6).all()
    assert len(torch.unique(q4)) <= 16 * (w.numel() // 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_init_beats_plain_quantisation_and_improves_with_iterations(bits):
    base_w = _net().lin0.weight.detach().clone()
    errors = []
    for iters in (1, 4):
        config = LoraConfig(target_modules=["lin0"], r=8, lora_alpha=16, init_lora_weights="loftq",
                            loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters))
        model = get_peft_model(_net(), config)
        layer = model.base_model.model.lin0
        q = layer.get_base_layer().weight
        if iters == 1:  # one step: the base holds exactly the quantised weight
            want = fake_quantize_nf4(base_w) if bits == 4 else fake_quantize_int8(base_w)
            torch.testing.assert_close(q, want)
        effective = q + layer.delta_weight("default")  # the model at the start of training
        errors.append((effective - base_w).norm().item())
        plain = ((fake_quantize_nf4(base_w) if bits == 4 else fake_quantize_int8(base_w)) - base_w).norm().item()
        assert errors[-1] < 0.9 * plain
    assert errors[1] <= errors[0] + 1e-6
    # the config round-trips (PEFT's key and dict form)
    assert model.peft_config["default"].to_dict()["loftq_config"] == {"loftq_bits": bits, "loftq_iter": 4}


def test_loftq_factors_with_rank_above_layer_and_negative_alpha():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    a, b, q = loftq_factors(w, r=8, scaling=-2.0, bits=8, iters=2)
    assert a.shape == (8, 5) and b.shape == (6, 8)
    torch.testing.assert_close(q + -2.0 * b @ a, w, atol=1e-4, rtol=1e-4)  # full rank: exact


def test_loftq_config_rules():
    # PEFT's messages (its own check needs scipy, not installed here)
    with pytest.raises(ValueError, match="`loftq_config` must be specified"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.warns(UserWarning, match="will be ignored"):
        c = LoraConfig(loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    assert c.loftq_config == {}
    with pytest.raises(ValueError, match="loftq_bits"):
        LoftQConfig(loftq_bits=3)
    with pytest.raises(ValueError, match="loftq_bits"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1})


def test_loftq_adapter_saves_and_loads_in_peft(tmp_path):
    config = LoraConfig(target_modules=["lin0"], r=4, init_lora_weights="loftq", loftq_config={"loftq_bits": 8,
                                                                                                "loftq_iter": 1})
    model = get_peft_model(_net(), config)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"]["loftq_bits"] == 8
    # loading does not re-run LoftQ: the (quantised) base model is the user's to provide
    base = _net()
    with torch.no_grad():
        base.lin0.weight.copy_(model.base_model.model.lin0.get_base_layer().weight)
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected)
    import importlib.util

    # PEFT re-runs LoftQ while loading, which needs scipy, bitsandbytes and a CUDA device
    if all(importlib.util.find_spec(m) for m in ("scipy", "bitsandbytes")) and torch.cuda.is_available():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), expected)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_eva_and_corda_refused_clearly(init):
    with pytest.raises(NotImplementedError, match=f"init_lora_weights='{init}' is not supported by peftkit"):
        LoraConfig(target_modules=["lin0"], init_lora_weights=init)


def test_adalora_config_is_a_lora_config_as_in_peft():
    ours = AdaLoraConfig(target_modules=["lin0"], total_step=10)
    theirs = peft.AdaLoraConfig(target_modules=["lin0"], total_step=10)
    assert isinstance(ours, LoraConfig) and isinstance(theirs, peft.LoraConfig)
    assert issubclass(AdaLoraConfig, LoraConfig)
    # AdaLoRA keeps its own defaults and checks
    assert (ours.init_r, ours.target_r, ours.peft_type) == (theirs.init_r, theirs.target_r, "ADALORA")
    with pytest.raises(ValueError, match="total_step"):
        AdaLoraConfig(target_modules=["lin0"])
    masked = AdaLoraConfig(target_modules=["lin0"], total_step=10, rank_pattern={"lin0.lora_E": [True, False]})
    assert masked.rank_pattern == {"lin0.lora_E": [True, False]}  # keep-masks, which LoRA's rules would refuse
    with pytest.raises(ValueError):
        LoraConfig(target_modules=["lin0"], rank_pattern={"lin0": [True, False]})
    # every LoRA field PEFT's AdaLoraConfig inherits that peftkit's LoraConfig has
    import dataclasses

    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    assert lora_fields <= {f.name for f in dataclasses.fields(AdaLoraConfig)}


def test_from_pretrained_keeps_the_folders_method(tmp_path):
    lora = get_peft_model(_net(), LoraConfig(target_modules=["lin0"]))
    lora.save_pretrained(tmp_path / "lora")
    ada = get_peft_model(_net(), AdaLoraConfig(target_modules=["lin0"], total_step=10))
    ada.save_pretrained(tmp_path / "ada")
    assert type(AdaLoraConfig.from_pretrained(tmp_path / "lora")) is LoraConfig  # as PEFT
    assert type(peft.AdaLoraConfig.from_pretrained(str(tmp_path / "lora"))) is peft.LoraConfig
    assert type(LoraConfig.from_pretrained(tmp_path / "ada")) is AdaLoraConfig
    loaded = PeftModel.from_pretrained(_net(), tmp_path / "ada")
    assert str(loaded.peft_type) == "ADALORA"
