"""prepare_model_for_compiled_hotswap (issue 17): pad LoRA ranks and make scalings tensors so that
hotswap_adapter of adapters with other ranks / alphas needs no recompilation; against PEFT given the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit import PeftModel, get_peft_model, hotswap_adapter, prepare_model_for_compiled_hotswap

peft = pytest.importorskip("peft")
dynamo = pytest.importorskip("torch._dynamo")
from peft.utils.hotswap import hotswap_adapter as peft_hotswap  # noqa: E402
from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.lin1 = nn.Linear(64, 4)

    def forward(self, x):
        h = torch.relu(self.lin0(x)).view(-1, 1, 4, 4)
        return self.lin1(torch.relu(self.conv(h)).flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def _saved(tmp_path, name, r, alpha, seed):
    torch.manual_seed(seed)
    model = peft.get_peft_model(_net(), peft.LoraConfig(target_modules=["lin0", "conv", "lin1"], r=r, lora_alpha=alpha,
                                                        init_lora_weights=False))
    model.save_pretrained(str(tmp_path / name))
    return tmp_path / name


def _load(lib, path):
    return lib.PeftModel.from_pretrained(_net(), str(path)).eval()


def test_prepare_then_hotswap_smaller_rank_matches_peft(tmp_path):
    first = _saved(tmp_path, "first", r=8, alpha=16, seed=1)
    second = _saved(tmp_path, "second", r=4, alpha=3, seed=2)
    ours, theirs = _load(peftkit, first), _load(peft, first)
    with torch.no_grad():
        before = ours(X)
    prepare_model_for_compiled_hotswap(ours, target_rank=12, config=ours.peft_config)
    peft_prepare(theirs, target_rank=12, config=theirs.peft_config)
    lin0 = ours.base_model.model.lin0
    assert lin0.lora_A["default"].weight.shape == (12, 8) and lin0.lora_B["default"].weight.shape == (16, 12)
    assert ours.base_model.model.conv.lora_A["default"].weight.shape[0] == 12
    assert isinstance(lin0.scaling["default"], torch.Tensor)
    assert ours.peft_config["default"].r == 12
    with torch.no_grad():
        torch.testing.assert_close(ours(X), before, atol=1e-6, rtol=1e-5)  # padding changes nothing
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=1e-5)
    a_id, scale_id = lin0.lora_A["default"].weight.data_ptr(), id(lin0.scaling["default"])
    hotswap_adapter(ours, str(second), adapter_name="default")
    peft_hotswap(theirs, str(second), adapter_name="default")
    assert lin0.lora_A["default"].weight.data_ptr() == a_id and id(lin0.scaling["default"]) == scale_id
    with torch.no_grad():
        want = _load(peftkit, second)(X)
        torch.testing.assert_close(ours(X), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=1e-5)


def test_compiled_model_hotswaps_without_recompiling(tmp_path):
    first = _saved(tmp_path, "first", r=4, alpha=8, seed=1)
    second = _saved(tmp_path, "second", r=8, alpha=2, seed=2)
    model = _load(peftkit, first)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(X)
        hotswap_adapter(model, str(second), adapter_name="default")
        with dynamo.config.patch(error_on_recompile=True):
            got = compiled(X)
        torch.testing.assert_close(got, _load(peftkit, second)(X), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="before"):
        prepare_model_for_compiled_hotswap(compiled)
    with pytest.warns(UserWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(compiled, check_compiled="warn")
    dynamo.reset()


def test_prepare_refusals(tmp_path):
    model = _load(peftkit, _saved(tmp_path, "first", r=8, alpha=16, seed=1))
    with pytest.raises(ValueError, match="smaller than the rank"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert model.base_model.model.lin0.lora_A["default"].weight.shape[0] == 8  # unchanged
    with pytest.raises(ValueError, match="check_compiles"):
        prepare_model_for_compiled_hotswap(model, check_compiled="sometimes")
    with pytest.raises(ValueError, match="No adapter layers"):
        prepare_model_for_compiled_hotswap(_net())
    # without preparation a larger rank cannot be swapped in
    bigger = _saved(tmp_path, "bigger", r=12, alpha=16, seed=3)
    with pytest.raises(ValueError, match="prepare_model_for_compiled_hotswap"):
        hotswap_adapter(model, str(bigger), adapter_name="default")
