"""peftkit.helpers (issue 17): PEFT's peft.helpers functions, against PEFT given the same weights."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit import get_peft_model
from peftkit.helpers import (check_if_peft_model, disable_input_dtype_casting, rescale_adapter_scale,
                             update_forward_signature, update_generate_signature, update_signature)

peft = pytest.importorskip("peft")
import peft.helpers as peft_helpers  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.lin0(x)).unsqueeze(1)
        return self.head(self.conv(h).flatten(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))


def _pair():
    make = lambda lib: lib.LoraConfig(target_modules=["lin0", "conv"], init_lora_weights=False, lora_alpha=16)  # noqa: E731
    theirs = peft.get_peft_model(_net(), make(peft))
    ours = get_peft_model(_net(), make(peftkit))
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def test_check_if_peft_model(tmp_path):
    _, ours = _pair()
    ours.save_pretrained(tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "adapter", tmp_path / "empty", tmp_path / "nowhere"):
        assert check_if_peft_model(str(path)) == peft_helpers.check_if_peft_model(str(path))
    assert check_if_peft_model(str(tmp_path / "adapter")) is True
    assert check_if_peft_model(str(tmp_path / "empty")) is False


@pytest.mark.parametrize("multiplier", [0.5, 2, 0.0])
def test_rescale_adapter_scale_matches_peft_and_restores(multiplier):
    theirs, ours = _pair()
    with torch.no_grad():
        before = ours(X)
        with rescale_adapter_scale(ours, multiplier), peft_helpers.rescale_adapter_scale(theirs, multiplier):
            inside = ours(X)
            torch.testing.assert_close(inside, theirs(X), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours(X), before)
        if multiplier == 0.0:  # no adapter contribution: the base model's output
            torch.testing.assert_close(inside, _net()(X), atol=1e-6, rtol=1e-5)
        else:
            assert not torch.allclose(inside, before)


def test_rescale_adapter_scale_restores_after_error_and_checks_input():
    _, ours = _pair()
    layer = ours.base_model.model.lin0
    scaling = dict(layer.scaling)
    with pytest.raises(RuntimeError, match="boom"):
        with rescale_adapter_scale(ours, 3.0):
            assert layer.scaling["default"] == pytest.approx(3 * scaling["default"])
            raise RuntimeError("boom")
    assert layer.scaling == scaling
    with pytest.raises(TypeError, match="multiplier"):
        with rescale_adapter_scale(ours, "2"):
            pass
    with pytest.raises(ValueError, match="LoraLayer"):
        with rescale_adapter_scale(get_peft_model(_net(), peftkit.LoHaConfig(target_modules=["lin0"])), 0.5):
            pass


def test_disable_input_dtype_casting():
    # a bfloat16 base with float32 LoRA: the conv layer casts its input to float32 unless casting is disabled
    make = lambda lib: lib.LoraConfig(target_modules=["conv"], init_lora_weights=False)  # noqa: E731
    ours = get_peft_model(_net().to(torch.bfloat16), make(peftkit))
    theirs = peft.get_peft_model(_net().to(torch.bfloat16), make(peft))
    ours.load_state_dict(theirs.state_dict())
    x = X.to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        for model, helper in ((ours, disable_input_dtype_casting), (theirs, peft_helpers.disable_input_dtype_casting)):
            with helper(model):
                with pytest.raises(RuntimeError):  # the float32 adapter now sees a bfloat16 input, as in PEFT
                    model(x)
            model(x)  # restored
        with disable_input_dtype_casting(ours, active=False):
            torch.testing.assert_close(ours(x), theirs(x))
    assert ours.base_model.model.conv.cast_input_dtype_enabled is True


def test_update_signature_on_transformers_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(base, peftkit.LoraConfig(target_modules=["c_attn"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    update_signature(model)
    assert model.forward.__doc__ == GPT2LMHeadModel.forward.__doc__
    assert "input_ids" in inspect.signature(model.forward).parameters
    assert model.generate.__doc__ == type(base).generate.__doc__
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
        out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, 7)
    update_forward_signature(model)  # idempotent
    update_generate_signature(model)
    assert "input_ids" in inspect.signature(model.forward).parameters
    with pytest.raises(ValueError, match="not supported"):
        update_signature(model, method="backward")
