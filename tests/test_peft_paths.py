"""Issue 17: PEFT's module paths (``peft.tuners.tuners_utils``, ``peft.tuners.lora``, ``peft.mapping``,
``peft.utils``) as peftkit's own objects under ``peftkit.<same path>``; PEFT's layer-level names on peftkit's
layers; ``inject_adapter_in_model(low_cpu_mem_usage=True)``. Against ``peft`` where both have the behaviour."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit import (
    AdaLoraConfig,
    BOFTConfig,
    HRAConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MissConfig,
    OFTConfig,
    PeftType,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peftkit.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peftkit.tuners import lora
from peftkit.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_submodules, check_target_module_exists
from peftkit.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

peft = pytest.importorskip("peft")
HERE = os.path.dirname(os.path.abspath(__file__))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lin0 = nn.Linear(8, 16)
        self.conv1 = nn.Conv1d(16, 16, 1)
        self.conv2 = nn.Conv2d(16, 16, 1)
        self.conv3 = nn.Conv3d(16, 16, 1)
        self.lin1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        h = torch.relu(self.lin0(self.emb(ids)))  # (b, t, 16)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h = self.conv2(h.transpose(1, 2)[..., None]).squeeze(-1).transpose(1, 2)
        h = self.conv3(h.transpose(1, 2)[..., None, None]).squeeze(-1).squeeze(-1).transpose(1, 2)
        return self.head(self.lin1(h))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
LINEARS = ["lin0", "lin1"]


@pytest.mark.parametrize("config", [
    LoraConfig(target_modules=LINEARS), LoHaConfig(target_modules=LINEARS), LoKrConfig(target_modules=LINEARS),
    OFTConfig(target_modules=LINEARS, r=0, oft_block_size=4), BOFTConfig(target_modules=LINEARS, boft_block_size=4),
    HRAConfig(target_modules=LINEARS), MissConfig(target_modules=LINEARS, r=4),
    AdaLoraConfig(target_modules=LINEARS, total_step=10),
], ids=lambda c: type(c).__name__)
def test_every_adapter_layer_is_a_base_tuner_layer(config):
    model = get_peft_model(_net(), config)
    layers = [name for name, m in model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert layers == LINEARS
    assert not isinstance(nn.Linear(2, 2), BaseTunerLayer)
    assert isinstance(model.base_model, BaseTuner)
    assert PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type] is type(model.base_model)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[config.peft_type] is type(config)
    assert PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type] == model.prefix
    assert PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type].uses_shared_state is False


def test_lora_layer_classes_and_reprs_match_peft():
    targets = ["emb", "lin0", "conv1", "conv2", "conv3"]
    ours = get_peft_model(_net(), LoraConfig(target_modules=targets))
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(target_modules=targets))
    expected = {"emb": lora.Embedding, "lin0": lora.Linear, "conv1": lora.Conv1d, "conv2": lora.Conv2d,
                "conv3": lora.Conv3d}
    for name, cls in expected.items():
        ours_layer, theirs_layer = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
        assert type(ours_layer) is cls and isinstance(ours_layer, lora.LoraLayer)
        assert not isinstance(ours_layer, tuple(c for c in expected.values() if c is not cls and c is not lora.ConvNd))
        # PEFT prints "lora.<Class>(": so do we (the class names are PEFT's too)
        assert repr(ours_layer).split("(", 1)[0] == repr(theirs_layer).split("(", 1)[0] or name == "conv1"
        assert repr(ours_layer).startswith(f"lora.{cls.__name__}(")
    # PEFT's LoRA layer status names the same classes
    kinds = {s.name: s.module_type for s in ours.get_layer_status()}
    assert kinds["model.conv2"] == "lora.Conv2d" == {s.name: s.module_type for s in theirs.get_layer_status()}["model.conv2"]


def test_get_submodules_matches_peft():
    ours = get_peft_model(_net(), LoraConfig(target_modules=LINEARS))
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(target_modules=LINEARS))
    from peft.utils import _get_submodules as peft_get_submodules

    ours_keys = [k for k, _ in ours.named_modules()]
    theirs_keys = [k for k, _ in theirs.named_modules()]
    for key in ("", "base_model.model.lin0", "base_model.model.lin0.lora_A.default", "base_model.model.head"):
        assert key in ours_keys and key in theirs_keys
        p, t, n = _get_submodules(ours, key)
        pp, tt, nn_ = peft_get_submodules(theirs, key)
        assert n == nn_ and type(t).__name__ == type(tt).__name__
        assert (p.get_submodule(n) if n else p) is t
    with pytest.raises(AttributeError):
        _get_submodules(ours, "base_model.model.nothing")


def test_check_target_module_exists_matches_peft():
    from peft.tuners.tuners_utils import check_target_module_exists as theirs

    cases = [dict(target_modules=["q", "v"]), dict(target_modules=r".*\.(q|k)"),
             dict(target_modules=["q"], layers_to_transform=[1], layers_pattern="layers"),
             dict(target_modules=["q", "k"], exclude_modules=["k"]),
             dict(target_modules=["q", "v"], modules_to_save=["v"])]
    # (a key equal to a target name outside any layer, "q", is targeted by PEFT despite layers_to_transform; peftkit
    # applies layers_to_transform to every key, as its injection does)
    keys = ["model.layers.0.q", "model.layers.1.q", "model.layers.1.k", "model.layers.1.v", "model.qq", "x.q"]
    for kw in cases:
        for key in keys:
            assert check_target_module_exists(LoraConfig(**kw), key) == bool(theirs(peft.LoraConfig(**kw), key)), (kw, key)


def test_layer_level_peft_names():
    model = get_peft_model(_net(), LoraConfig(target_modules=LINEARS, modules_to_save=["head"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=LINEARS, modules_to_save=["head"]))
    layer = model.base_model.model.lin0
    assert layer.adapter_layer_names == layer.adapter_slots and "lora_A" in layer.adapter_layer_names
    assert set(layer.other_param_names) == {"r", "lora_alpha", "scaling", "lora_dropout"}
    assert layer._all_available_adapter_names() == ["default", "other"]
    assert layer.active_adapter == "default" and layer.disable_adapters is False
    b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert torch.allclose(layer.get_delta_weight("default"), b @ a * layer.scaling["default"])
    layer.enable_adapters(False)
    assert layer.disable_adapters and not layer.lora_A["default"].weight.requires_grad
    layer.enable_adapters(True)
    assert not layer.disable_adapters and layer.lora_A["default"].weight.requires_grad
    layer.set_adapter("other")  # one name, not a sequence of characters
    assert layer.active_adapters == ["other"]
    head = model.base_model.model.head
    assert isinstance(head, AuxiliaryTrainingWrapper) and AuxiliaryTrainingWrapper is ModulesToSaveWrapper
    assert head._adapters == {"default", "other"} and head.active_adapters == ["default"]
    assert head.adapter_layer_names == ("modules_to_save",) and head.other_param_names == ()
    head.set_adapter("other")
    assert head.active_adapters == ["other"]
    head.enable_adapters(False)
    assert head.adapters_disabled and not any(p.requires_grad for p in head.modules_to_save.parameters())


def test_disable_adapter_warns_on_mixed_layer_states_like_peft():
    for lib in (peft, peftkit):
        model = lib.get_peft_model(_net(), lib.LoraConfig(target_modules=LINEARS))
        model.base_model.model.lin0.enable_adapters(False)
        with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
            with model.disable_adapter():
                pass
        assert not model.base_model.model.lin0.disable_adapters and not model.base_model.model.lin1.disable_adapters


def test_deleted_adapter_leaves_no_forward_path_entry():
    model = get_peft_model(_net(), LoHaConfig(target_modules=LINEARS))
    model.add_adapter("foobar", LoHaConfig(target_modules=LINEARS))
    paths = model.base_model.model.lin0.forward_paths
    assert "foobar" in paths
    model.delete_adapter("foobar")
    assert "foobar" not in paths and list(paths) == ["default"]  # a live view, not a copy taken before


def test_inject_low_cpu_mem_usage_leaves_the_adapter_on_meta_and_loads_like_peft():
    src = inject_adapter_in_model(LoraConfig(target_modules=LINEARS, init_lora_weights=False), _net())
    sd = get_peft_model_state_dict(src)
    results = []
    for lib in (peft, peftkit):
        model = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=LINEARS), _net(), low_cpu_mem_usage=True)
        devices = {n: p.device.type for n, p in model.named_parameters()}
        assert {d for n, d in devices.items() if "lora_" in n} == {"meta"}
        assert {d for n, d in devices.items() if "lora_" not in n} == {"cpu"}
        lib.set_peft_model_state_dict(model, sd, low_cpu_mem_usage=True)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
        with torch.no_grad():
            results.append(model(IDS))
    with torch.no_grad():
        assert torch.allclose(results[1], src(IDS)) and torch.allclose(results[0], results[1], atol=1e-6)


def test_meta_adapter_without_low_cpu_mem_usage_is_refused_unchanged():
    model = inject_adapter_in_model(LoraConfig(target_modules=LINEARS), _net(), low_cpu_mem_usage=True)
    sd = {k: torch.ones(v.shape) for k, v in get_peft_model_state_dict(
        inject_adapter_in_model(LoraConfig(target_modules=LINEARS), _net())).items()}
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True"):
        set_peft_model_state_dict(model, sd)
    assert all(p.is_meta for n, p in model.named_parameters() if "lora_" in n)


def test_peft_type_keys_and_strings_both_work():
    assert PEFT_TYPE_TO_TUNER_MAPPING["LORA"] is PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] is peftkit.LoraModel
    assert PeftType.LORA in PEFT_TYPE_TO_TUNER_MAPPING and PeftType.LOHA in list(PEFT_TYPE_TO_TUNER_MAPPING)
    with pytest.raises(KeyError, match="VERA"):
        PEFT_TYPE_TO_TUNER_MAPPING["VERA"]
    cfg = peftkit.mapping.get_peft_config({"peft_type": "LOHA", "r": 3, "target_modules": ["lin0"]})
    assert type(cfg) is LoHaConfig and cfg.r == 3


def test_transformers_peft_integration_recognises_peftkit_layers_through_the_alias():
    """transformers' PEFT integration imports ``peft.tuners.tuners_utils.BaseTunerLayer`` and
    ``peft.utils.ModulesToSaveWrapper`` and walks the model with ``isinstance``; with peftkit's package tree in
    PEFT's place (``sys.modules``), its enable/disable/set/active adapter methods drive peftkit's layers."""
    code = r"""
import sys, torch, peftkit, peftkit.tuners, peftkit.tuners.tuners_utils, peftkit.utils
import importlib.metadata
for name in ("tuners", "tuners.tuners_utils", "tuners.lora", "utils", "mapping"):
    sys.modules["peft." + name] = importlib.import_module("peftkit." + name)
sys.modules["peft"] = peftkit
import transformers.integrations.peft as hf_peft
# the installed reference PEFT (0.21.2) is below transformers' version gate (0.22); the gate reads the
# distribution's metadata, not the module, so it is switched off here: what is tested is the isinstance walk
hf_peft.check_peft_version = lambda min_version: None
from models import _llama
from peftkit import LoraConfig, get_peft_model
torch.manual_seed(0)
ids = torch.tensor([[1, 2, 3, 4]])
hf = _llama()
with torch.no_grad():
    base = hf(ids).logits
model = get_peft_model(hf, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
model.add_adapter("other", LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
with torch.no_grad():
    adapted = model(ids).logits
assert not torch.allclose(adapted, base)
hf._hf_peft_config_loaded = True  # what transformers' add_adapter/load_adapter set
hf.peft_config = model.peft_config
assert hf.active_adapters() == ["default"]
hf.disable_adapters()
with torch.no_grad():
    assert torch.allclose(hf(ids).logits, base)
hf.enable_adapters()
with torch.no_grad():
    assert torch.allclose(hf(ids).logits, adapted)
hf.set_adapter("other")
assert hf.active_adapters() == ["other"]
with torch.no_grad():
    assert not torch.allclose(hf(ids).logits, adapted)
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("cls", ["LoraConfig", "LoKrConfig", "HRAConfig"])
def test_merge_adapter_merges_what_each_layer_has_active_like_peft(cls):
    """Layers activated one by one (``layer.set_adapter([...])``, as PEFT's own tests and some clients do): a plain
    ``merge_adapter()`` merges each layer's active adapters, so the merged model computes what it computed before."""
    outs = []
    for lib in (peft, peftkit):
        model = lib.get_peft_model(_net(), getattr(lib, cls)(target_modules=LINEARS, init_weights=False)
                                   if cls != "LoraConfig" else lib.LoraConfig(target_modules=LINEARS,
                                                                              init_lora_weights=False)).eval()
        torch.manual_seed(1)
        model.add_adapter("b", getattr(lib, cls)(target_modules=LINEARS, init_weights=False)
                          if cls != "LoraConfig" else lib.LoraConfig(target_modules=LINEARS, init_lora_weights=False))
        for m in model.modules():
            if isinstance(m, (peft.tuners.tuners_utils.BaseTunerLayer, BaseTunerLayer)):
                m.set_adapter(["default", "b"])
        with torch.no_grad():
            both = model(IDS)
            model.merge_adapter()
            merged = model(IDS)
        assert torch.allclose(merged, both, atol=1e-4)
        outs.append(both)
    assert outs[0].shape == outs[1].shape


def test_two_active_modules_to_save_copies_are_refused_with_peft_message():
    model = get_peft_model(_net(), LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]  # unchanged
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.base_model.model.head.set_adapter(["default", "other"])


@pytest.mark.parametrize("kinds", [("dora", "dora", "dora"), ("lora", "dora", "dora"), ("dora", "lora", "dora")])
@pytest.mark.parametrize("target", ["lin0", "emb", "conv2"])
def test_several_active_dora_adapters_merge_to_what_they_compute_like_peft(kinds, target):
    """DoRA's norm comes from the unmerged base weight: merging DoRA adapters one after another (after plain LoRA
    ones too) gives the outputs of the unmerged forward, and unmerging restores the base weight."""
    outputs = {}
    for lib in (peft, peftkit):
        model = None
        names = []
        for i, kind in enumerate(kinds):
            config = lib.LoraConfig(target_modules=[target], init_lora_weights=False, use_dora=kind == "dora")
            torch.manual_seed(10 + i)
            if model is None:
                model = lib.get_peft_model(_net(), config, adapter_name=f"a{i}").eval()
            else:
                model.add_adapter(f"a{i}", config)
            names.append(f"a{i}")
        if lib is peftkit:  # the same adapter weights in both libraries (through the checkpoint format)
            for n in names:
                set_peft_model_state_dict(model, outputs["theirs_state"][n], adapter_name=n)
        else:
            outputs["theirs_state"] = {n: peft.get_peft_model_state_dict(model, adapter_name=n) for n in names}
        base_weight = model.base_model.model.get_submodule(target).get_base_layer().weight.detach().clone()
        model.base_model.set_adapter(names)
        with torch.no_grad():
            forward = model(IDS)
            model.merge_adapter()
            merged = model(IDS)
            model.unmerge_adapter()
        assert torch.allclose(merged, forward, atol=1e-4), lib.__name__
        layer = model.base_model.model.get_submodule(target)
        assert torch.allclose(layer.get_base_layer().weight, base_weight, atol=1e-5), lib.__name__
        outputs[lib.__name__] = forward
    assert torch.allclose(outputs["peftkit"], outputs["peft"], atol=1e-5)
