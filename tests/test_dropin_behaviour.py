"""Issue 17, behaviour differences: each test runs the same scenario through Hugging Face PEFT and peftkit (same
weights) and asserts peftkit does what PEFT does, or refuses clearly where the issue asks for a refusal."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import BOFTConfig, HRAConfig, LoHaConfig, LoraConfig, OFTConfig, PeftConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self, prefix_name: str = "lin1") -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        setattr(self, prefix_name, nn.Linear(16, 16))
        self._second = prefix_name
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x=None, input=None):
        x = x if x is not None else input
        h = torch.relu(self.lin0(x))
        return self.head(self.norm(getattr(self, self._second)(h)))


def _net(**kw) -> nn.Module:
    torch.manual_seed(0)
    return Net(**kw).eval()


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))


def _rg(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _noise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "oft_", "boft_", "hra_", "hada_")):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


# ----------------------------------------------------------------------------------------------- 1. buffers
def test_modules_to_save_buffers_saved_and_loaded_both_ways(tmp_path):
    cfg = dict(target_modules=["lin0"], modules_to_save=["norm"])
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(**cfg))
    theirs.train()
    for _ in range(3):  # moves the running statistics of the trained copy
        theirs(X * 3 + 1)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "theirs"))
    keys = set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert "base_model.model.norm.running_mean" in keys
    ours = PeftModel.from_pretrained(_net(), tmp_path / "theirs")
    torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=0)

    ours.save_pretrained(tmp_path / "ours")
    assert {"base_model.model.norm.running_mean", "base_model.model.norm.running_var",
            "base_model.model.norm.num_batches_tracked"} <= set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    back = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "ours"))
    torch.testing.assert_close(back(X), theirs(X), rtol=0, atol=0)


# ----------------------------------------------------------------------------------- 2. OFT/BOFT merge, train mode
@pytest.mark.parametrize("make", [
    lambda lib: lib.OFTConfig(target_modules=["lin0", "lin1"], r=4, oft_block_size=0, module_dropout=0.5, init_weights=False),
    lambda lib: lib.BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=4, boft_dropout=0.5, init_weights=False),
])
def test_orthogonal_merge_in_train_mode_has_no_dropout(make):
    merged = []
    for _ in range(2):
        model = get_peft_model(_net(), make(peftkit))
        model.train()
        model.merge_adapter()
        merged.append(model.base_model.model.lin0.get_base_layer().weight.detach().clone())
        model.unmerge_adapter()
        torch.testing.assert_close(model.base_model.model.lin0.get_base_layer().weight, _net().lin0.weight)
    assert torch.equal(merged[0], merged[1])
    # and equal to PEFT's merge of the same weights
    theirs = peft.get_peft_model(_net(), make(peft))
    ours = get_peft_model(_net(), make(peftkit))
    ours.load_state_dict(theirs.state_dict(), strict=False)
    theirs.train(); ours.train()
    theirs.merge_adapter(); ours.merge_adapter()
    torch.testing.assert_close(ours.base_model.model.lin0.get_base_layer().weight,
                               theirs.base_model.model.lin0.get_base_layer().weight, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- 3. base names with the prefix
@pytest.mark.parametrize("prefix_name,make", [
    ("lora_foobar", lambda lib: lib.LoraConfig(target_modules=["lin0"])),
    ("lokr_foobar", lambda lib: lib.LoKrConfig(target_modules=["lin0"])),
])
def test_base_module_named_like_the_prefix_stays_frozen(prefix_name, make):
    ours = get_peft_model(_net(prefix_name=prefix_name), make(peftkit))
    theirs = peft.get_peft_model(_net(prefix_name=prefix_name), make(peft))
    assert not getattr(ours.base_model.model, prefix_name).weight.requires_grad
    assert _rg(ours) == _rg(theirs)


# --------------------------------------------------------------------------------- 4. cat with rank_pattern
def test_add_weighted_adapter_cat_with_rank_pattern_matches_peft():
    def build(lib):
        model = lib.get_peft_model(_net(), lib.LoraConfig(r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 6}))
        model.add_adapter("b", lib.LoraConfig(r=8, target_modules=["lin0", "lin1"], rank_pattern={"lin0": 2}))
        return model
    theirs, ours = build(peft), build(peftkit)
    _noise(theirs)
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours):
        m.add_weighted_adapter(["default", "b"], [0.7, 0.4], "cat", combination_type="cat")
        m.set_adapter("cat")
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-5, atol=1e-6)
    assert ours.base_model.model.lin1.lora_A["cat"].weight.shape == theirs.base_model.model.lin1.lora_A["cat"].weight.shape


# ------------------------------------------------------------------------------------- 5. from_pretrained class
def test_config_from_pretrained_returns_the_folders_class(tmp_path):
    get_peft_model(_net(), LoHaConfig(target_modules=["lin0"])).save_pretrained(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    ours = LoraConfig.from_pretrained(tmp_path)
    assert type(theirs).__name__ == type(ours).__name__ == "LoHaConfig"
    assert isinstance(PeftConfig.from_pretrained(tmp_path), LoHaConfig)


# ------------------------------------------------------------------------------------ 6. ModulesToSaveWrapper
def test_modules_to_save_wrapper_keyword_call_and_active_weight():
    def build(lib):
        model = lib.get_peft_model(_net(), lib.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
        with torch.no_grad():
            model.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
        return model
    theirs, ours = build(peft), build(peftkit)
    h = torch.randn(2, 16)
    wrapper, their_wrapper = ours.base_model.model.head, theirs.base_model.model.head
    torch.testing.assert_close(wrapper(input=h), their_wrapper(input=h))
    assert wrapper.weight is wrapper.modules_to_save["default"].weight
    assert torch.equal(wrapper.weight, their_wrapper.weight)
    # the keyword call also works with one adapter per row
    ours.add_adapter("b", LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    out = ours(input=X, adapter_names=["default", "b", "__base__", "default", "b", "b"])
    assert out.shape == (6, 3)


# ----------------------------------------------------------------------------------------- 7. requires_grad
def _cfg(lib, **kw):
    return lib.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], **kw)


def _scenario(lib, name: str, folder: str) -> dict[str, dict[str, bool]]:
    out: dict[str, dict[str, bool]] = {}
    lib.get_peft_model(_net(), _cfg(lib)).save_pretrained(os.path.join(folder, "a"))
    if name == "disable":
        model = lib.get_peft_model(_net(), _cfg(lib))
        with model.disable_adapter():
            out["inside"] = _rg(model)
        out["after"] = _rg(model)
    elif name == "loaded_for_inference":
        model = lib.PeftModel.from_pretrained(_net(), os.path.join(folder, "a"))
        out["loaded"] = _rg(model)
        with model.disable_adapter():
            pass
        out["after_disable"] = _rg(model)
        model.set_adapter("default")
        out["after_set_adapter"] = _rg(model)
    elif name in ("load_trainable", "load_frozen", "user_flags"):
        model = lib.get_peft_model(_net(), _cfg(lib))
        if name == "user_flags":
            model.base_model.model.lin0.lora_A["default"].weight.requires_grad_(False)
            model.base_model.model.lin1.base_layer.bias.requires_grad_(True)
        model.load_adapter(os.path.join(folder, "a"), "second", is_trainable=(name != "load_frozen"))
        out["after_load"] = _rg(model)
        model.set_adapter("second")
        out["after_set_adapter"] = _rg(model)
    elif name == "inference_config":
        out["init"] = _rg(lib.get_peft_model(_net(), _cfg(lib, inference_mode=True)))
    elif name == "set_requires_grad":
        model = lib.get_peft_model(_net(), _cfg(lib))
        model.add_adapter("b", _cfg(lib))
        model.set_requires_grad("b")
        out["b_on"] = _rg(model)
        model.set_requires_grad(["default", "b"], requires_grad=False)
        out["all_off"] = _rg(model)
    return out


@pytest.mark.parametrize("name", ["disable", "loaded_for_inference", "load_trainable", "load_frozen", "user_flags",
                                  "inference_config", "set_requires_grad"])
def test_requires_grad_rules_match_peft(name, tmp_path):
    theirs = _scenario(peft, name, str(tmp_path / "theirs"))
    ours = _scenario(peftkit, name, str(tmp_path / "ours"))
    assert ours.keys() == theirs.keys()
    for step in theirs:
        assert ours[step] == theirs[step], step
    if name == "load_trainable":
        assert theirs["after_load"]["base_model.model.lin0.lora_A.second.weight"]
    if name == "user_flags":
        assert not ours["after_load"]["base_model.model.lin0.lora_A.default.weight"]


# -------------------------------------------------------------------------------------- 8. half precision, CPU
@pytest.mark.parametrize("make", [
    lambda lib: lib.HRAConfig(target_modules=["lin0", "lin1"], r=4, init_weights=False),
    lambda lib: lib.OFTConfig(target_modules=["lin0", "lin1"], r=4, oft_block_size=0, use_cayley_neumann=False,
                              init_weights=False),
    lambda lib: lib.BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=4, init_weights=False),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_merge_on_cpu(make, dtype):
    theirs = peft.get_peft_model(_net(), make(peft))
    ours = get_peft_model(_net(), make(peftkit))
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = X.to(dtype)
    out = ours(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), theirs(x).float(), rtol=0.05, atol=0.05)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(merged(x).float(), theirs.merge_and_unload()(x).float(), rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- 9. keyword arguments really used
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(tmp_path):
    for autocast in (True, False):
        ours = get_peft_model(_net().to(torch.bfloat16), LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast)
        theirs = peft.get_peft_model(_net().to(torch.bfloat16), peft.LoraConfig(target_modules=["lin0"]),
                                     autocast_adapter_dtype=autocast)
        want = theirs.base_model.model.lin0.lora_A["default"].weight.dtype
        assert ours.base_model.model.lin0.lora_A["default"].weight.dtype == want
        assert want == (torch.float32 if autocast else torch.bfloat16)
        ours.add_adapter("b", LoraConfig(target_modules=["lin0"]), autocast_adapter_dtype=autocast)
        assert ours.base_model.model.lin0.lora_A["b"].weight.dtype == want
        assert ours(X.to(torch.bfloat16)).dtype == torch.bfloat16
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_net().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert loaded.base_model.model.lin0.lora_A["default"].weight.dtype == torch.bfloat16
    loaded.load_adapter(tmp_path, "c", autocast_adapter_dtype=True)
    assert loaded.base_model.model.lin0.lora_A["c"].weight.dtype == torch.float32


def test_safe_serialization_false_writes_a_bin_file_peft_reads(tmp_path):
    ours = get_peft_model(_net(), LoraConfig(target_modules=["lin0"]))
    _noise(ours)
    ours.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(_net(), str(tmp_path))
    torch.testing.assert_close(theirs(X), ours(X))
    torch.testing.assert_close(PeftModel.from_pretrained(_net(), tmp_path)(X), ours(X))


def test_save_embedding_layers_true_stores_the_base_embedding(tmp_path):
    from models import MODELS

    spec = MODELS["llama"]
    ours = get_peft_model(spec.build(), LoraConfig(r=4, target_modules=["q_proj"]))
    ours.save_pretrained(tmp_path / "with", save_embedding_layers=True)
    ours.save_pretrained(tmp_path / "without", save_embedding_layers=False)
    theirs = peft.get_peft_model(spec.build(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.save_pretrained(str(tmp_path / "theirs"), save_embedding_layers=True)
    with_keys = set(load_file(tmp_path / "with" / "adapter_model.safetensors"))
    assert with_keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.weight" in with_keys
    assert not any("embed_tokens" in k for k in load_file(tmp_path / "without" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="save_embedding_layers"):
        ours.save_pretrained(tmp_path / "bad", save_embedding_layers="yes")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_path_initial_model_for_weight_conversion_equals_peft(init, tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=init)
    ours = get_peft_model(_net(), LoraConfig(**cfg))
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(**cfg))
    theirs.load_state_dict(ours.state_dict())  # same initial factors and residual base
    for m, lib, d in ((ours, peftkit, "ours"), (theirs, peft, "theirs")):
        m.peft_config["default"].init_lora_weights = True
        m.save_pretrained(str(tmp_path / d / "init"))
        m.peft_config["default"].init_lora_weights = init
    _noise(ours)
    theirs.load_state_dict(ours.state_dict())  # "trained"
    ours.save_pretrained(tmp_path / "ours" / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "ours" / "init"))
    theirs.save_pretrained(str(tmp_path / "theirs" / "lora"),
                           path_initial_model_for_weight_conversion=str(tmp_path / "theirs" / "init"))
    o = load_file(tmp_path / "ours" / "lora" / "adapter_model.safetensors")
    t = load_file(tmp_path / "theirs" / "lora" / "adapter_model.safetensors")
    assert o.keys() == t.keys()
    for k in o:
        torch.testing.assert_close(o[k], t[k], rtol=1e-6, atol=1e-6)
    oc = json.load(open(tmp_path / "ours" / "lora" / "adapter_config.json"))
    tc = json.load(open(tmp_path / "theirs" / "lora" / "adapter_config.json"))
    assert (oc["r"], oc["lora_alpha"], oc["init_lora_weights"]) == (tc["r"], tc["lora_alpha"], tc["init_lora_weights"]) == (8, 16, True)
    # the converted adapter on the ORIGINAL base gives the trained model's outputs, in both libraries
    torch.testing.assert_close(PeftModel.from_pretrained(_net(), tmp_path / "ours" / "lora")(X), ours(X), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(peft.PeftModel.from_pretrained(_net(), str(tmp_path / "ours" / "lora"))(X), ours(X),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ 10. missing guards
def test_second_adapter_with_bias_is_refused_like_peft():
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match="bias"):
        theirs.add_adapter("b", peft.LoraConfig(target_modules=["lin0"], bias="lora_only"))
    ours = get_peft_model(_net(), LoraConfig(target_modules=["lin0"], bias="all"))
    before = dict(ours.named_parameters())
    with pytest.raises(ValueError, match="bias='none'"):
        ours.add_adapter("b", LoraConfig(target_modules=["lin0"], bias="lora_only"))
    assert dict(ours.named_parameters()).keys() == before.keys() and list(ours.peft_config) == ["default"]
    ours.add_adapter("c", LoraConfig(target_modules=["lin0"]))  # bias="none" is fine


def test_unmatched_rank_and_alpha_pattern_keys_warn():
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match.*'nothere'"):
        get_peft_model(_net(), LoraConfig(target_modules=["lin0"], rank_pattern={"nothere": 2, "lin0": 4}))
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern keys did not match.*'zzz'"):
        get_peft_model(_net(), LoraConfig(target_modules=["lin0"], alpha_pattern={"zzz": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(_net(), LoraConfig(target_modules=["lin0"], rank_pattern={"lin0": 2}))


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gru = nn.GRU(4, 4, batch_first=True)

    def forward(self, x):
        return self.gru(self.lin(x))[0]


def test_mixed_batch_with_unroutable_modules_to_save_is_refused_clearly():
    torch.manual_seed(0)
    model = get_peft_model(GRUNet(), LoraConfig(r=2, target_modules=["lin"], modules_to_save=["gru"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["lin"], modules_to_save=["gru"]))
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="cannot route the modules_to_save module GRU"):
        model(x, adapter_names=["default", "b"])
    assert model(x).shape == (2, 3, 4)  # a normal call still works afterwards


# ------------------------------------------------------------------------------------------------- 11. smaller
def test_load_adapter_returns_missing_and_unexpected_keys_like_peft(tmp_path):
    get_peft_model(_net(), LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"])).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    del sd["base_model.model.lin0.lora_A.weight"]
    sd["base_model.model.foo.lora_A.weight"] = torch.zeros(2)
    save_file(sd, tmp_path / "adapter_model.safetensors")
    results = []
    for lib in (peft, peftkit):
        model = lib.get_peft_model(_net(), lib.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"]))
        # peftkit refuses a checkpoint with missing tensors unless asked (issue 13); PEFT loads it with a report
        kw = {"allow_missing_keys": True} if lib is peftkit else {}
        results.append(model.load_adapter(str(tmp_path), "second", **kw))
    theirs, ours = results
    assert ours.missing_keys == theirs.missing_keys == ["base_model.model.lin0.lora_A.second.weight"]
    assert ours.unexpected_keys == theirs.unexpected_keys


def test_ignore_mismatched_sizes_skips_like_peft(tmp_path):
    get_peft_model(_net(), LoraConfig(r=4, target_modules=["lin0", "lin1"])).save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    cfg["r"] = 8  # the folder's config no longer fits its weights
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    # as a folder written by another tool: weights without peftkit's config digest (else the hand-edited config
    # would be refused as not belonging to these weights, issue 13)
    save_file(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.safetensors")
    for lib in (peft, peftkit):
        model = lib.get_peft_model(_net(), lib.LoraConfig(r=8, target_modules=["lin0", "lin1"]))
        with pytest.raises((RuntimeError, ValueError), match="shape"):
            model.load_adapter(str(tmp_path), "x")
        result = model.load_adapter(str(tmp_path), "y", ignore_mismatched_sizes=True)
        assert len(result.missing_keys) == 4, lib.__name__
        assert model.base_model.model.lin0.lora_A["y"].weight.shape == (8, 8)
    loaded = PeftModel.from_pretrained(_net(), tmp_path, ignore_mismatched_sizes=True)
    assert loaded.base_model.model.lin0.lora_A["default"].weight.shape == (8, 8)


def test_from_pretrained_keeps_the_config_object(tmp_path):
    get_peft_model(_net(), LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path)
    for lib in (peft, peftkit):
        c = lib.LoraConfig(target_modules=["lin0"])
        model = lib.PeftModel.from_pretrained(_net(), str(tmp_path), config=c)
        assert model.peft_config["default"] is c, lib.__name__


def test_model_card_written(tmp_path):
    import yaml

    from models import MODELS

    for lib, where in ((peft, "theirs"), (peftkit, "ours")):
        base = MODELS["llama"].build()
        base.config._name_or_path = "org/tiny"
        lib.get_peft_model(base, lib.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / where))
        lib.get_peft_model(_net(), lib.LoraConfig(target_modules=["lin0"], base_model_name_or_path="MLP")
                           ).save_pretrained(str(tmp_path / where / "custom"))
    for where in ("theirs", "ours"):
        meta = yaml.safe_load((tmp_path / where / "README.md").read_text().split("---")[1])
        assert meta["base_model"] == "org/tiny" and meta["library_name"] == "peft" and "lora" in meta["tags"], where
        custom = yaml.safe_load((tmp_path / where / "custom" / "README.md").read_text().split("---")[1])
        assert "base_model" not in custom, where
    model = get_peft_model(_net(), LoraConfig(target_modules=["lin0"]))
    (tmp_path / "README.md").write_text("mine\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "mine\n", "an existing card is not overwritten"


def test_merging_twice_warns_like_peft():
    for lib in (peft, peftkit):
        model = lib.get_peft_model(_net(), lib.LoraConfig(target_modules=["lin0"], init_lora_weights=False))
        model.merge_adapter()
        with pytest.warns(UserWarning, match="All adapters are already merged"):
            model.merge_adapter()
    before = model.base_model.model.lin0.get_base_layer().weight.clone()
    assert torch.equal(model.base_model.model.lin0.get_base_layer().weight, before)


def test_from_json_file_returns_a_dict(tmp_path):
    get_peft_model(_net(), LoraConfig(target_modules=["lin0"])).save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_config.json")
    ours, theirs = PeftConfig.from_json_file(path), peft.PeftConfig.from_json_file(path)
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    assert ours == theirs == json.load(open(path))


# ------------------------------------------------------------ found by PEFT's own suite: inference_mode caches
@pytest.mark.parametrize("make", [
    lambda: OFTConfig(target_modules=["lin0"], r=0, oft_block_size=3, init_weights=False),
    lambda: LoraConfig(target_modules=["lin0"], use_dora=True, init_lora_weights=False),
])
def test_a_forward_under_inference_mode_does_not_break_later_training(make):
    from peftkit.methods.orthogonal import orthogonal_ops

    orthogonal_ops._skew_index.cache_clear()  # the OFT index cache is process-wide: start it empty
    model = get_peft_model(_net(), make())
    with torch.inference_mode():
        model(X)  # first use of the layer's cached helper tensors
    model.train()
    model(X).pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2, padding=1)
        self.lin = nn.Linear(8, 2)

    def forward(self, x):
        return self.lin(self.conv(x).mean(dim=(2, 3)))


def test_lora_on_grouped_convolution_equals_peft(tmp_path):
    torch.manual_seed(0)
    base = GroupedConv().eval()
    x = torch.randn(2, 4, 5, 5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["conv", "lin"],
                                                                      init_lora_weights=False))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["conv", "lin"], init_lora_weights=False))
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x))
    ours.save_pretrained(tmp_path)
    torch.testing.assert_close(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))(x), ours(x))
    before = ours.base_model.model.lin.get_base_layer().weight.clone()
    with pytest.raises(NotImplementedError, match="grouped convolution"):
        ours.merge_adapter()
    assert torch.equal(ours.base_model.model.lin.get_base_layer().weight, before), "nothing merged"
    with pytest.raises(ValueError, match="rank divisible by groups"):
        get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["conv"]))
