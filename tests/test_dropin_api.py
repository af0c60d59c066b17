"""Issue 17, public API: each new public name against Hugging Face PEFT where both have it (same weights)."""

from __future__ import annotations

import copy
import re
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit import LoraConfig, LoHaConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(self.lin1(torch.relu(self.lin0(x)))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))


def _noise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "hada_" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _pair(make=lambda lib: lib.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"])):
    theirs = peft.get_peft_model(_net(), make(peft))
    _noise(theirs)
    ours = get_peft_model(_net(), make(peftkit))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ state dicts
def test_get_peft_model_state_dict_equals_peft():
    theirs, ours = _pair()
    _same(peftkit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))
    ours.add_adapter("b", LoraConfig(target_modules=["lin0"]))
    theirs.add_adapter("b", peft.LoraConfig(target_modules=["lin0"]))
    ours.load_state_dict(theirs.state_dict())
    _same(peftkit.get_peft_model_state_dict(ours, adapter_name="b"),
          peft.get_peft_model_state_dict(theirs, adapter_name="b"))
    # values from a given state dict instead of the live tensors
    sd = {k: torch.zeros_like(v) for k, v in ours.state_dict().items()}
    got = peftkit.get_peft_model_state_dict(ours, state_dict=sd)
    assert all(not v.any() for v in got.values())
    with pytest.raises(ValueError, match="No adapter named 'zz'"):
        peftkit.get_peft_model_state_dict(ours, adapter_name="zz")


def test_set_peft_model_state_dict_loads_peft_tensors():
    theirs, _ = _pair()
    fresh = get_peft_model(_net(), LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"]))
    result = peftkit.set_peft_model_state_dict(fresh, peft.get_peft_model_state_dict(theirs))
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(fresh(X), theirs(X), rtol=0, atol=0)
    # the other direction
    _, ours = _pair()
    other = peft.get_peft_model(_net(), peft.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"]))
    peft.set_peft_model_state_dict(other, peftkit.get_peft_model_state_dict(ours))
    torch.testing.assert_close(other(X), ours(X), rtol=0, atol=0)


def test_inject_adapter_in_model_matches_peft():
    cfg = dict(target_modules=["lin0", "lin1"])
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**cfg), _net())
    ours = peftkit.inject_adapter_in_model(LoraConfig(**cfg), _net())
    assert type(ours) is Net, "the model itself comes back, no PeftModel around it"
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in theirs.named_parameters()}
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    _noise(theirs)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=0)
    ours_sd, theirs_sd = peftkit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    _same(ours_sd, theirs_sd)
    assert all(not k.startswith("base_model.") for k in ours_sd)
    # a second adapter and a state_dict to load at injection
    again = peftkit.inject_adapter_in_model(LoraConfig(**cfg), _net(), state_dict=theirs_sd)
    torch.testing.assert_close(again(X), theirs(X), rtol=0, atol=0)
    peftkit.inject_adapter_in_model(LoraConfig(**cfg), again, adapter_name="b")
    assert "b" in again.lin0.lora_A
    result = peftkit.set_peft_model_state_dict(again, theirs_sd, adapter_name="b")
    assert result.missing_keys == []
    with pytest.raises(ValueError, match="holds no peftkit adapters"):
        peftkit.get_peft_model_state_dict(_net())


def test_get_base_model_state_dict_equals_peft_and_the_original():
    theirs, ours = _pair()
    want = peft.get_base_model_state_dict(theirs)
    got = peftkit.get_base_model_state_dict(ours)
    _same(got, want)
    _same(got, _net().state_dict())


# --------------------------------------------------------------------------------------------- PeftModel bits
def test_peftmodel_properties_match_peft():
    theirs, ours = _pair()
    for m in (theirs, ours):
        m.add_adapter("b", type(m.peft_config["default"])(target_modules=["lin1"], modules_to_save=["norm"]))
    assert ours.modules_to_save == theirs.modules_to_save == {"head", "norm"}
    assert ours.prefix == theirs.prefix == "lora_"
    assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names)
    assert ours.has_active_enabled_adapter == theirs.has_active_enabled_adapter is True
    with ours.disable_adapter(), theirs.disable_adapter():
        assert ours.has_active_enabled_adapter == theirs.has_active_enabled_adapter is False
    assert ours.has_active_enabled_adapter is True
    plain = get_peft_model(_net(), LoraConfig(target_modules=["lin0"]))
    assert plain.modules_to_save is None


def _status_fields(s) -> dict:
    return {k: getattr(s, k) for k in ("name", "enabled", "active_adapters", "merged_adapters", "requires_grad",
                                        "available_adapters", "devices")}


def test_layer_and_model_status_match_peft():
    theirs, ours = _pair()
    for m in (theirs, ours):
        m.add_adapter("b", type(m.peft_config["default"])(target_modules=["lin0"]))
    for step in ("plain", "merged", "disabled"):
        if step == "merged":
            theirs.merge_adapter(); ours.merge_adapter()
        if step == "disabled":
            theirs.unmerge_adapter(); ours.unmerge_adapter()
            theirs.base_model.disable_adapter_layers(); ours.base_model.disable_adapter_layers()
        t_layers = sorted((_status_fields(s) for s in theirs.get_layer_status()), key=lambda d: d["name"])
        o_layers = sorted((_status_fields(s) for s in ours.get_layer_status()), key=lambda d: d["name"])
        assert o_layers == t_layers, step
        t, o = theirs.get_model_status(), ours.get_model_status()
        for field in ("base_model_type", "trainable_params", "total_params", "num_adapter_layers", "enabled",
                      "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"):
            assert getattr(o, field) == getattr(t, field), (step, field)
        assert o.peft_types == {"default": "LORA", "b": "LORA"}
    assert peftkit.get_model_status(ours) == ours.get_model_status()
    with pytest.raises(ValueError, match="No adapter layers"):
        peftkit.get_layer_status(_net())


def test_set_requires_grad():
    ours = get_peft_model(_net(), LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    ours.add_adapter("b", LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    ours.set_requires_grad("b")
    status = ours.get_model_status().requires_grad
    assert status == {"default": True, "b": True}
    ours.set_requires_grad(["default"], requires_grad=False)
    assert ours.get_model_status().requires_grad == {"default": False, "b": True}
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        ours.set_requires_grad("nope")


def test_no_matching_module_error_is_peft_s_class_of_error():
    with pytest.raises(peftkit.NoMatchingPeftModuleError, match="matched no module"):
        get_peft_model(_net(), LoraConfig(target_modules=["nothere"]))
    assert issubclass(peftkit.NoMatchingPeftModuleError, ValueError)
    from peft.utils.error import NoMatchingPeftModuleError as TheirError

    with pytest.raises(TheirError):  # PEFT raises its class of the same name in the same case
        peft.get_peft_model(_net(), peft.LoraConfig(target_modules=["nothere"]))


# ------------------------------------------------------------------------------------------------- configs
def test_peft_version_written_and_read_by_peft(tmp_path):
    assert LoraConfig().peft_version.split("@")[0] == "0.21.2"
    assert peftkit.OFTConfig(target_modules=["lin0"]).peft_version is not None
    model = get_peft_model(_net(), peftkit.OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=4,
                                                     init_weights=False))
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "adapter_config.json"))["peft_version"] == LoraConfig().peft_version
    theirs = peft.PeftModel.from_pretrained(_net(), str(tmp_path))  # PEFT parses the version (OFT checks it)
    torch.testing.assert_close(theirs(X), model(X), rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(str(tmp_path / "back"))
    assert PeftModel.from_pretrained(_net(), tmp_path / "back").peft_config["default"].peft_version == \
        theirs.peft_config["default"].peft_version


def test_get_peft_model_keyword_arguments():
    model = get_peft_model(_net(), LoraConfig(target_modules=["lin0"]), revision="abc", low_cpu_mem_usage=True)
    assert model.peft_config["default"].revision == "abc"
    assert isinstance(get_peft_model(_net(), LoraConfig(target_modules=["lin0"]), mixed=True), peftkit.PeftMixedModel)


# ----------------------------------------------------------------------------- add_weighted_adapter, new types
def _two_adapters():
    def make(lib):
        model = lib.get_peft_model(_net(), lib.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
        model.add_adapter("b", lib.LoraConfig(r=4, lora_alpha=4, target_modules=["lin0", "lin1"]))
        return model
    theirs = make(peft)
    _noise(theirs)
    ours = make(peftkit)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("kind,kw", [
    ("ties", dict(density=0.5)),
    ("ties", dict(density=0.3, majority_sign_method="frequency")),
    ("magnitude_prune", dict(density=0.4)),
    ("dare_linear", dict(density=0.5)),
    ("dare_ties", dict(density=0.6, majority_sign_method="frequency")),
])
def test_add_weighted_adapter_task_arithmetic_matches_peft(kind, kw):
    theirs, ours = _two_adapters()
    for m in (theirs, ours):
        torch.manual_seed(7)  # DARE's random drops: same draws in the same order as PEFT
        m.add_weighted_adapter(["default", "b"], [0.8, -0.5], "mix", combination_type=kind, **kw)
        m.set_adapter("mix")
    for layer in ("lin0", "lin1"):
        for f in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(getattr(ours.base_model.model, layer), f)["mix"].weight,
                                       getattr(getattr(theirs.base_model.model, layer), f)["mix"].weight)
    torch.testing.assert_close(ours(X), theirs(X))
    a = ours.base_model.model.lin0.lora_A["mix"].weight
    if kind in ("ties", "magnitude_prune"):
        assert 0 < (a != 0).float().mean() < 1, "pruning left some entries and removed some"


def test_add_weighted_adapter_task_arithmetic_refusals():
    _, ours = _two_adapters()
    with pytest.raises(ValueError, match="needs density"):
        ours.add_weighted_adapter(["default", "b"], [0.5, 0.5], "x", combination_type="ties")
    with pytest.raises(ValueError, match="majority_sign_method"):
        ours.add_weighted_adapter(["default", "b"], [0.5, 0.5], "x", combination_type="ties", density=0.5,
                                  majority_sign_method="mode")
    assert "x" not in ours.peft_config and "x" not in ours.base_model.model.lin0.lora_A


# ---------------------------------------------------------------------------------- init olora / orthogonal
def test_olora_init_equals_peft_and_round_trips(tmp_path):
    make = lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights="olora")
    theirs = peft.get_peft_model(_net(), make(peft))
    ours = get_peft_model(_net(), make(peftkit))
    for name in ("lin0", "lin1"):
        o, t = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
        torch.testing.assert_close(o.lora_A["default"].weight, t.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.lora_B["default"].weight, t.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.get_base_layer().weight, t.get_base_layer().weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(X), _net()(X), rtol=1e-5, atol=1e-5)  # identity at start
    _noise(ours)
    ours.save_pretrained(tmp_path)
    back = peft.PeftModel.from_pretrained(_net(), str(tmp_path))  # onto the original base: residual rebuilt
    torch.testing.assert_close(back(X), ours(X), rtol=1e-5, atol=1e-5)
    again = PeftModel.from_pretrained(_net(), tmp_path)
    torch.testing.assert_close(again(X), ours(X), rtol=1e-5, atol=1e-5)


def test_orthogonal_init_is_identity_with_both_factors_nonzero():
    torch.manual_seed(0)
    model = get_peft_model(_net(), LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights="orthogonal"))
    layer = model.base_model.model.lin0
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.abs().sum() > 0 and b.abs().sum() > 0
    assert torch.linalg.matrix_rank(a) == 2 and torch.linalg.matrix_rank(b) == 2
    torch.testing.assert_close(b @ a, torch.zeros(16, 8), rtol=0, atol=1e-5)
    torch.testing.assert_close(model(X), _net()(X), rtol=1e-5, atol=1e-5)
    loss = model(X).pow(2).sum()
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0, "both factors learn from the first step"
    theirs = peft.get_peft_model(_net(), peft.LoraConfig(r=4, target_modules=["lin0"], init_lora_weights="orthogonal"))
    t = theirs.base_model.model.lin0
    torch.testing.assert_close(t.lora_B["default"].weight @ t.lora_A["default"].weight, torch.zeros(16, 8), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        LoraConfig(r=3, target_modules=["lin0"], init_lora_weights="orthogonal")
    with pytest.raises(ValueError, match="linear layers only"):
        get_peft_model(nn.Sequential(nn.Embedding(10, 4)), LoraConfig(r=2, target_modules=["0"], init_lora_weights="olora"))


# ------------------------------------------------------------------------------------------------- LoRA+
class EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.ln(self.lin(self.emb(ids))))


def test_create_loraplus_optimizer_groups_equal_peft():
    from peft.optimizers import create_loraplus_optimizer as theirs_fn

    def build(lib):
        torch.manual_seed(0)
        return lib.get_peft_model(EmbNet(), lib.LoraConfig(target_modules=["emb", "lin"], modules_to_save=["ln"],
                                                           bias="lora_only"))
    kw = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01, loraplus_lr_embedding=1e-5)
    theirs, ours = build(peft), build(peftkit)
    t_opt = theirs_fn(theirs, torch.optim.AdamW, **kw)
    o_opt = peftkit.create_loraplus_optimizer(ours, torch.optim.AdamW, **kw)
    t_names = {id(p): n for n, p in theirs.named_parameters()}
    o_names = {id(p): n for n, p in ours.named_parameters()}
    assert len(t_opt.param_groups) == len(o_opt.param_groups) == 4
    for tg, og in zip(t_opt.param_groups, o_opt.param_groups):
        assert sorted(o_names[id(p)] for p in og["params"]) == sorted(t_names[id(p)] for p in tg["params"])
        assert (og["lr"], og["weight_decay"]) == (tg["lr"], tg["weight_decay"])
    assert o_opt.param_groups[2]["lr"] == 16e-3 and o_opt.param_groups[2]["params"]
    loss = ours(torch.tensor([[1, 2, 3]])).pow(2).sum()
    loss.backward()
    o_opt.step()  # a real optimiser over the groups


# ------------------------------------------------------------------------------------------------- hotswap
def test_hotswap_adapter_equals_loading_fresh_and_peft(tmp_path):
    def save(seed, alpha, folder):
        m = get_peft_model(_net(), LoraConfig(r=4, lora_alpha=alpha, target_modules=["lin0", "lin1"]))
        _noise(m, seed)
        m.save_pretrained(folder)
    save(1, 8, tmp_path / "one")
    save(2, 16, tmp_path / "two")
    ours = PeftModel.from_pretrained(_net(), tmp_path / "one")
    a_ref = ours.base_model.model.lin0.lora_A["default"].weight
    peftkit.hotswap_adapter(ours, tmp_path / "two", adapter_name="default")
    assert ours.base_model.model.lin0.lora_A["default"].weight is a_ref, "swapped in place"
    fresh = PeftModel.from_pretrained(_net(), tmp_path / "two")
    torch.testing.assert_close(ours(X), fresh(X), rtol=0, atol=0)
    assert ours.base_model.model.lin0.scaling["default"] == 4.0
    from peft.utils.hotswap import hotswap_adapter as their_hotswap

    theirs = peft.PeftModel.from_pretrained(_net(), str(tmp_path / "one"))
    their_hotswap(theirs, str(tmp_path / "two"), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-6, atol=1e-6)


def test_hotswap_adapter_refusals_leave_the_adapter(tmp_path):
    get_peft_model(_net(), LoraConfig(r=4, target_modules=["lin0", "lin1"])).save_pretrained(tmp_path / "one")
    get_peft_model(_net(), LoraConfig(r=8, target_modules=["lin0", "lin1"])).save_pretrained(tmp_path / "rank")
    get_peft_model(_net(), LoraConfig(r=4, target_modules=["lin0"])).save_pretrained(tmp_path / "targets")
    ours = PeftModel.from_pretrained(_net(), tmp_path / "one")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="different rank"):  # a larger rank (a smaller one fits, as in PEFT)
        peftkit.hotswap_adapter(ours, tmp_path / "rank", adapter_name="default")
    with pytest.raises(ValueError, match="same modules"):
        peftkit.hotswap_adapter(ours, tmp_path / "targets", adapter_name="default")
    with pytest.raises(ValueError, match="No adapter named 'x'"):
        peftkit.hotswap_adapter(ours, tmp_path / "one", adapter_name="x")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------------ push_to_hub
class FakeHubApi:
    """Stands in for huggingface_hub.HfApi: records the calls and copies the folder it is asked to upload."""

    def __init__(self, store):
        self.store, self.calls = store, []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=None, revision=None, create_pr=False):
        import shutil

        self.calls.append(("upload_folder", repo_id, commit_message, revision, create_pr))
        shutil.copytree(folder_path, self.store / repo_id.replace("/", "--"))
        return "commit-url"


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path):
    model = get_peft_model(_net(), LoraConfig(target_modules=["lin0"]))
    model.add_adapter("b", LoraConfig(target_modules=["lin1"]))
    _noise(model)
    api = FakeHubApi(tmp_path)
    assert model.push_to_hub("me/tiny", private=True, commit_message="hi", api=api) == "commit-url"
    assert api.calls[0] == ("create_repo", "me/tiny", True, True)
    assert api.calls[1] == ("upload_folder", "me/tiny", "hi", None, False)
    repo = tmp_path / "me--tiny"
    assert sorted(os.listdir(repo)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "b"]
    loaded = PeftModel.from_pretrained(_net(), repo)
    loaded.load_adapter(repo / "b", "b")
    for name in ("default", "b"):
        model.set_adapter(name); loaded.set_adapter(name)
        torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)


@pytest.mark.parametrize("kind,kw", [
    ("ties_svd", dict(density=0.5)),
    ("magnitude_prune_svd", dict(density=0.4)),
    ("dare_linear_svd", dict(density=0.5)),
    ("dare_ties_svd", dict(density=0.7, majority_sign_method="frequency")),
])
def test_add_weighted_adapter_task_arithmetic_svd_matches_peft(kind, kw):
    theirs, ours = _two_adapters()
    for m in (theirs, ours):
        torch.manual_seed(11)
        m.add_weighted_adapter(["default", "b"], [0.8, -0.5], "mix", combination_type=kind, svd_rank=4, **kw)
        m.set_adapter("mix")
    for layer in ("lin0", "lin1"):
        o, t = getattr(ours.base_model.model, layer), getattr(theirs.base_model.model, layer)
        # SVD factors are unique up to signs: compare the deltas
        torch.testing.assert_close(o.delta_weight("mix"), t.get_delta_weight("mix"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-4, atol=1e-5)


def test_set_base_model_state_dict_round_trip_and_peft():
    theirs, ours = _pair()
    fresh = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in _net().state_dict().items()}
    r_ours = peftkit.set_base_model_state_dict(ours, fresh)
    r_theirs = peft.set_base_model_state_dict(theirs, fresh)
    assert list(r_ours.missing_keys) == list(r_theirs.missing_keys) == []
    _same(peftkit.get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs))
    _same(peftkit.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs))  # adapters untouched
    bad = dict(fresh, **{"lin0.weight": torch.zeros(3, 3)})
    before = peftkit.get_base_model_state_dict(ours)
    with pytest.raises(ValueError, match="lin0.weight"):
        peftkit.set_base_model_state_dict(ours, bad)
    _same(peftkit.get_base_model_state_dict(ours), {k: v.clone() for k, v in before.items()})


def test_delete_adapter_messages_and_nested_disable_like_peft():
    for lib in (peft, peftkit):
        model = lib.get_peft_model(_net(), lib.LoraConfig(target_modules=["lin0"]))
        with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
            model.delete_adapter("unknown-adapter")
        model.add_adapter("b", lib.LoraConfig(target_modules=["lin0"]))
        model.merge_adapter()
        with pytest.raises(ValueError, match=re.escape("Cannot delete adapter(s) ['default'] while they are merged.")):
            model.delete_adapter("default")
        assert "default" in model.peft_config and "default" in model.base_model.model.lin0.lora_A
        model.unmerge_adapter()
        layer = model.base_model.model.lin0
        disabled = lambda: layer.disable_adapters if lib is peft else layer.adapters_disabled  # noqa: E731
        with model.disable_adapter():
            with model.disable_adapter():
                assert not model.has_active_enabled_adapter
            assert disabled() and not model.has_active_enabled_adapter, lib.__name__  # inner exit: still off
        assert not disabled() and model.has_active_enabled_adapter
