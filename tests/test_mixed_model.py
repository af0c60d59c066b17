"""PeftMixedModel (issue 17): adapters of different methods on one model, against Hugging Face PEFT's
PeftMixedModel given the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit import PeftMixedModel, PeftModel, get_peft_model

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))

CONFIGS = {
    "first": lambda lib: lib.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False),
    "second": lambda lib: lib.LoHaConfig(target_modules=["lin0"], init_weights=False),
    "third": lambda lib: lib.LoKrConfig(target_modules=["lin1", "lin0"], init_weights=False),
}


def _build(lib, configs=CONFIGS, active=None):
    names = list(configs)
    model = lib.get_peft_model(_net(), configs[names[0]](lib), adapter_name=names[0], mixed=True)
    for name in names[1:]:
        model.add_adapter(name, configs[name](lib))
    model.set_adapter(active or names)
    return model.eval()


def _pair(configs=CONFIGS, active=None):
    theirs = _build(peft, configs, active)
    ours = _build(peftkit, configs, active)
    assert set(ours.state_dict()) == set(theirs.state_dict())  # same layout: layers nest the same way
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def test_get_peft_model_mixed_returns_mixed_model_with_nested_layers():
    ours = _build(peftkit)
    assert isinstance(ours, PeftMixedModel)
    lin0 = ours.base_model.model.lin0
    # the latest method wraps the earlier ones; the innermost module is the original nn.Linear
    assert type(lin0).__name__ == "LoKrLayer" and type(lin0.base_layer).__name__ == "LoHaLayer"
    assert isinstance(lin0.get_base_layer(), nn.Linear)
    assert sorted(ours.targeted_module_names) == ["lin0", "lin1"]


@pytest.mark.parametrize("active", [["first", "second", "third"], ["second"], ["third", "first"]])
def test_forward_matches_peft(active):
    theirs, ours = _pair(active=active)
    with torch.no_grad():
        expected = theirs(X)
        got = ours(X)
        base = _net()(X)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapters change the output
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_disable_adapter_gives_base_output():
    _, ours = _pair()
    with torch.no_grad(), ours.disable_adapter():
        torch.testing.assert_close(ours(X), _net()(X))


def test_requires_grad_follows_active_adapters():
    ours = _build(peftkit, active=["first", "third"])
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n and ".first" in n) or ("lokr_" in n and ".third" in n) for n in trainable)
    assert not any("hada_" in n for n in trainable)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n and "lokr_" not in n)


def test_merge_and_unload_matches_peft_and_unmerged_output():
    theirs, ours = _pair()
    with torch.no_grad():
        unmerged = ours(X)
        merged_theirs = theirs.merge_and_unload()
        merged_ours = ours.merge_and_unload()
        assert isinstance(merged_ours.lin0, nn.Linear) and type(merged_ours.lin0) is nn.Linear
        torch.testing.assert_close(merged_ours(X), unmerged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged_ours.lin0.weight, merged_theirs.lin0.weight, atol=1e-6, rtol=1e-5)


def test_lora_then_oft_merge_order_matches_peft():
    # OFT is multiplicative: the merged weight depends on the order, which must follow the forward's nesting
    configs = {
        "first": CONFIGS["first"],
        "rot": lambda lib: lib.OFTConfig(r=0, oft_block_size=4, target_modules=["lin0", "lin1"], init_weights=False),
    }
    theirs, ours = _pair(configs)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-5, rtol=1e-5)
        unmerged = ours(X)
        ours.merge_adapter()
        torch.testing.assert_close(ours(X), unmerged, atol=1e-4, rtol=1e-4)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(X), unmerged, atol=1e-4, rtol=1e-4)
        merged_ours = ours.merge_and_unload()
        merged_theirs = theirs.merge_and_unload()
        torch.testing.assert_close(merged_ours.lin1.weight, merged_theirs.lin1.weight, atol=1e-5, rtol=1e-5)


def test_unload_restores_base_modules_and_output():
    _, ours = _pair()
    restored = ours.unload()
    assert type(restored.lin0) is nn.Linear and type(restored.lin1) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(restored(X), _net()(X))


def test_delete_adapter_list_and_unknown_name():
    theirs, ours = _pair()
    ours.delete_adapter(["second", "third"])
    theirs.delete_adapter(["second", "third"])
    assert list(ours.peft_config) == ["first"]
    assert ours.active_adapters == ["first"]
    assert not any("hada_" in n or "lokr_" in n for n, _ in ours.named_parameters())
    with pytest.raises(ValueError, match="not found"):
        ours.delete_adapter("second")
    with pytest.raises(ValueError, match="not found"):
        ours.set_adapter(["first", "nope"])
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=1e-5)


def test_incompatible_method_is_refused_and_model_unchanged():
    ours = _build(peftkit)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        ours.add_adapter("ia3", peftkit.IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    assert list(ours.peft_config) == ["first", "second", "third"]
    assert set(ours.state_dict()) == set(before)
    with pytest.raises(ValueError, match="not compatible"):
        get_peft_model(_net(), peftkit.IA3Config(target_modules=["lin0"], feedforward_modules=[]), mixed=True)
    with pytest.raises(NotImplementedError, match="add_weighted_adapter"):
        ours.add_weighted_adapter(["first"], [1.0], "combo")
    with pytest.raises(TypeError, match="not supported"):
        ours.get_layer_status()


def test_save_each_adapter_and_load_back(tmp_path):
    _, ours = _pair()
    with torch.no_grad():
        expected = ours(X)
    ours.save_pretrained(tmp_path)
    # each adapter is saved in the single-method layout (nested tensors under the module's own path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "second" / "adapter_model.safetensors")
    assert "base_model.model.lin0.hada_w1_a" in keys
    loaded = PeftMixedModel.from_pretrained(_net(), tmp_path / "first" if (tmp_path / "first").exists() else tmp_path,
                                            adapter_name="first")
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.load_adapter(tmp_path / "third", "third")
    loaded.set_adapter(["first", "second", "third"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, atol=1e-6, rtol=1e-5)

    # a single adapter of the mixed model loads into a plain PeftModel and into PEFT, with the same output
    mixed_one = copy.deepcopy(ours)
    mixed_one.set_adapter("second")
    plain = PeftModel.from_pretrained(_net(), tmp_path / "second")
    theirs = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "second"))
    with torch.no_grad():
        want = mixed_one(X)
        torch.testing.assert_close(plain(X), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(theirs(X), want, atol=1e-6, rtol=1e-5)


def test_load_peft_saved_adapters_into_mixed_model(tmp_path):
    # adapters trained with plain PEFT models, combined in one mixed model: same output as PEFT's mixed model
    for name, make in CONFIGS.items():
        single = peft.get_peft_model(_net(), make(peft))
        torch.manual_seed(len(name))
        single.save_pretrained(str(tmp_path / name))
    theirs = peft.PeftMixedModel.from_pretrained(_net(), str(tmp_path / "first"), adapter_name="first")
    ours = PeftMixedModel.from_pretrained(_net(), tmp_path / "first", adapter_name="first")
    for name in ("second", "third"):
        theirs.load_adapter(str(tmp_path / name), name)
        ours.load_adapter(tmp_path / name, name)
    theirs.set_adapter(list(CONFIGS))
    ours.set_adapter(list(CONFIGS))
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=1e-5)


def test_delete_list_with_a_merged_adapter_is_atomic():
    ours = _build(peftkit, {"first": lambda lib: lib.LoraConfig(target_modules=["lin0"]),
                            "second": lambda lib: lib.LoHaConfig(target_modules=["lin1"])})
    ours.base_model.merge_adapter(adapter_names=["second"])
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['second'\] while they are merged"):
        ours.delete_adapter(["first", "second"])
    assert set(ours.peft_config) == {"first", "second"}
    assert "first" in ours.base_model.model.lin0.adapter_configs
    ours.delete_adapter(["first"])  # not merged: fine, and the other adapter stays active
    assert ours.active_adapters == ["second"]


def test_two_adapters_with_the_same_modules_to_save_cannot_be_active_together():
    ours = get_peft_model(_net(), peftkit.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]), "first",
                          mixed=True)
    ours.add_adapter("second", peftkit.LoHaConfig(target_modules=["lin0"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        ours.set_adapter(["first", "second"])
    assert ours.active_adapters == ["first"]
