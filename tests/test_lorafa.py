"""create_lorafa_optimizer (issue 17): LoRA-FA's projected gradient for B with A frozen, against PEFT's optimizer
(given the same weights and data) and against the least-squares definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit import LoraFAOptimizer, create_lorafa_optimizer, get_peft_model

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def _make(lib, **kw):
    return lib.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], r=4, lora_alpha=8,
                          init_lora_weights=False, **kw)


def _train(model, opt, steps=3):
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x, y = torch.randn(6, 8, generator=g), torch.randn(6, 3, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lorafa(monkeypatch, use_rslora):
    import peft.optimizers.lorafa as peft_lorafa

    # PEFT runs the projection under bfloat16 autocast where bf16 is available; compare with its float32 path
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda *a, **k: False)
    theirs = peft.get_peft_model(_net(), _make(peft, use_rslora=use_rslora))
    ours = get_peft_model(_net(), _make(peftkit, use_rslora=use_rslora))
    ours.load_state_dict(theirs.state_dict())
    a_before = ours.base_model.model.lin0.lora_A["default"].weight.clone()
    b_before = ours.base_model.model.lin0.lora_B["default"].weight.clone()
    opt_t = peft_lorafa.create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    opt_o = create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    assert isinstance(opt_o, LoraFAOptimizer)
    group = opt_o.param_groups[0]  # PEFT's group keys: names and per-parameter scaling factors
    pairs = dict(zip(group["names"], group["scaling_factors"]))
    assert pairs["base_model.model.lin0.lora_B.default.weight"] == pytest.approx(
        ours.base_model.model.lin0.scaling["default"])
    assert pairs["base_model.model.head.modules_to_save.default.weight"] is None
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)
    _train(theirs, opt_t)
    _train(ours, opt_o)
    want = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=1e-5, msg=key)
    lin0 = ours.base_model.model.lin0
    assert torch.equal(lin0.lora_A["default"].weight, a_before)  # A frozen
    assert not torch.allclose(lin0.lora_B["default"].weight, b_before)  # B trained


def test_projected_gradient_is_least_squares_solution():
    # s * g_B* A must equal the projection of the full-weight gradient g_W onto A's row space
    g = torch.Generator().manual_seed(0)
    a, g_w, s = torch.randn(4, 10, generator=g), torch.randn(7, 10, generator=g), 2.5
    g_b = s * g_w @ a.T  # the LoRA gradient of B for a layer whose weight gradient is g_W
    got = s * LoraFAOptimizer.projected_grad(g_b, a, s) @ a
    want = g_w @ torch.linalg.pinv(a) @ a
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_lorafa_on_conv_and_errors():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    model = get_peft_model(Conv(), peftkit.LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False))
    opt = create_lorafa_optimizer(model, r=2, lora_alpha=8, lr=1e-2)
    b = model.base_model.model.conv.lora_B["default"].weight
    before = b.clone()
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    assert not torch.equal(b, before)
    with pytest.raises(ValueError, match="use_rslora"):
        create_lorafa_optimizer(model, r=2, lora_alpha=8, lr=1e-2, use_rslora=True)
    loha = get_peft_model(Conv(), peftkit.LoHaConfig(target_modules=["conv"]))
    with pytest.raises(ValueError, match="active LoRA adapter"):
        create_lorafa_optimizer(loha, r=2, lora_alpha=8, lr=1e-2)
