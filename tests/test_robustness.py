"""Issue 13, one test per finding: nothing is lost, bad input is refused with an error naming the field/key/file."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from contract import noise_adapter
from models import MODELS
from peftkit import (
    AdaLoraConfig,
    KronAConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_adapter_state_dict,
    get_peft_model,
)
from peftkit.engine.io import SAFETENSORS_NAME, save_tensors

MLP = MODELS["mlp"]
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))


def _lora(**kw):
    kw.setdefault("target_modules", ["lin0", "lin1"])
    kw.setdefault("r", 2)
    return LoraConfig(**kw)


def _trained(config=None):
    model = get_peft_model(MLP.build(), config or _lora(init_lora_weights=False))
    noise_adapter(model, "default", seed=3)
    return model


def _snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def _unchanged(base, before):
    return all(torch.equal(before[k], v) for k, v in base.state_dict().items()) and before.keys() == base.state_dict().keys()


# ------------------------------------------------------------------------------------ saving nothing / misuse
def test_save_after_merge_and_unload_never_replaces_a_saved_adapter(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path)
    before = _snapshot(tmp_path)
    model.merge_and_unload()
    with pytest.raises(ValueError, match=r"Adapter 'default' has no tensors left.*unchanged"):
        model.save_pretrained(tmp_path)
    assert _snapshot(tmp_path) == before


def test_after_deleting_the_last_adapter_errors_are_clear_and_nothing_is_written(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path)
    before = _snapshot(tmp_path)
    model.delete_adapter("default")
    for call in (lambda: model.peft_type, lambda: model.merge_adapter(), lambda: model.base_model.method):
        with pytest.raises(ValueError, match="holds no adapter"):
            call()
    with pytest.raises(ValueError, match="Nothing to save.*holds no adapter"):
        model.save_pretrained(tmp_path)
    assert _snapshot(tmp_path) == before
    model.add_adapter("again", _lora())  # and the model can be used again
    assert model.peft_type == "LORA"


def test_second_get_peft_model_on_the_base_of_a_peft_model_is_refused():
    base = MLP.build()
    first = get_peft_model(base, _lora(init_lora_weights=False))
    noise_adapter(first, "default", seed=1)
    expected = first(X)
    with pytest.raises(ValueError, match="already holds an adapter named 'default' that another PeftModel manages"):
        get_peft_model(base, _lora(), adapter_name="second")
    with pytest.raises(ValueError, match="another PeftModel manages"):
        PeftModel.from_pretrained(base, "/nonexistent-never-read")
    assert torch.equal(first(X), expected)  # the first model still has its adapter active
    assert first.active_adapters == ["default"]


def test_generate_refuses_adapter_names_of_the_wrong_length():
    spec = MODELS["llama"]
    model = get_peft_model(spec.build(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    ids = spec.inputs(2)["input_ids"]
    for names in (["default"], ["default", "b", "b"]):
        with pytest.raises(ValueError, match=f"adapter_names has {len(names)} entries but the batch has 2 rows"):
            model.generate(input_ids=ids, max_new_tokens=2, adapter_names=names, do_sample=False)
        with pytest.raises(ValueError, match=f"adapter_names has {len(names)} entries but the batch has 2 rows"):
            model(input_ids=ids, adapter_names=names)
    out = model.generate(input_ids=ids, max_new_tokens=2, adapter_names=["default", "b"], do_sample=False)
    assert out.shape == (2, ids.shape[1] + 2)
    with pytest.raises(TypeError, match="one adapter name per row"):
        model.generate(input_ids=ids, max_new_tokens=2, adapter_names="default")


def test_selected_adapters_as_a_string_is_one_name(tmp_path):
    model = _trained()
    model.add_adapter("other", _lora())
    model.save_pretrained(tmp_path, selected_adapters="other")
    assert sorted(os.listdir(tmp_path)) == ["README.md", "other"]  # README.md: the model card, as PEFT writes


def test_set_adapter_with_no_names_is_refused():
    model = _trained()
    expected = model(X)
    with pytest.raises(ValueError, match="at least one adapter name.*disable_adapter"):
        model.set_adapter([])
    assert model.active_adapters == ["default"] and torch.equal(model(X), expected)


@pytest.mark.parametrize("name", ["training", "forward", "keys", "items", "update", "x" * 300, "a\nb"])
def test_reserved_and_overlong_adapter_names_are_refused_before_anything_is_written(tmp_path, name):
    model = _trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.add_adapter(name, _lora())
    with pytest.raises(ValueError, match="Invalid adapter name"):
        get_peft_model(MLP.build(), _lora(), adapter_name=name)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Invalid adapter name"):
        model.load_adapter(tmp_path, name)
    assert model.state_dict().keys() == before.keys()


def test_files_are_world_readable_like_normal_files_and_follow_the_umask(tmp_path):
    model = _trained()
    model.add_adapter("other", _lora())
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "shared")
        os.umask(0o077)
        model.save_pretrained(tmp_path / "private")
    finally:
        os.umask(old)
    for folder, mode, dmode in (("shared", 0o644, 0o755), ("private", 0o600, 0o700)):
        root = tmp_path / folder
        assert stat.S_IMODE(os.stat(root).st_mode) == dmode
        for rel in ("adapter_config.json", SAFETENSORS_NAME, "other/adapter_config.json", f"other/{SAFETENSORS_NAME}"):
            assert stat.S_IMODE(os.stat(root / rel).st_mode) == mode, (folder, rel)
        assert stat.S_IMODE(os.stat(root / "other").st_mode) == dmode


def test_hugging_face_peft_loads_our_folders_root_and_sub_folder(tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained()
    model.add_adapter("other", _lora(r=3, lora_alpha=5, init_lora_weights=False))
    noise_adapter(model, "other", seed=4)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # a save over a save (the folder swap) too
    theirs = peft.PeftModel.from_pretrained(MLP.build(), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "other"), "other")
    for name in ("default", "other"):
        model.set_adapter(name)
        theirs.set_adapter(name)
        assert torch.allclose(model(X), theirs(X), atol=1e-6), name


# ----------------------------------------------------------------------------------------------- bad numbers
def _checkpoint(tmp_path, mutate):
    model = _trained()
    model.save_pretrained(tmp_path)
    path = tmp_path / SAFETENSORS_NAME
    from safetensors.torch import load_file

    tensors = load_file(path)
    mutate(tensors)
    save_tensors(tensors, path)  # no digest: as another program would write it
    return tmp_path


KEY_A = "base_model.model.lin0.lora_A.weight"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_a_checkpoint_is_refused_naming_the_key_unless_allowed(tmp_path, bad):
    def mutate(t):
        t[KEY_A][0, 0] = bad
    folder = _checkpoint(tmp_path, mutate)
    base = MLP.build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{KEY_A} holds 1 NaN/inf.*allow_nonfinite=True"):
        PeftModel.from_pretrained(base, folder)
    assert _unchanged(base, before)
    loaded = PeftModel.from_pretrained(base, folder, allow_nonfinite=True)
    assert not torch.isfinite(loaded.base_model.model.lin0.lora_A["default"].weight).all()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_integer_or_bool_tensors_in_a_checkpoint_are_refused(tmp_path, dtype):
    def mutate(t):
        t[KEY_A] = (t[KEY_A] * 100).to(dtype)
    folder = _checkpoint(tmp_path, mutate)
    model = _trained()
    with pytest.raises(ValueError, match=rf"{KEY_A} has dtype {dtype}.*float32"):
        model.load_adapter(folder, "other")
    assert list(model.peft_config) == ["default"]


def test_missing_checkpoint_tensors_are_refused_unless_allowed(tmp_path):
    def mutate(t):
        del t["base_model.model.lin1.lora_B.weight"]
    folder = _checkpoint(tmp_path, mutate)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*base_model.model.lin1.lora_B.weight.*allow_missing_keys=True"):
        PeftModel.from_pretrained(MLP.build(), folder)
    loaded = PeftModel.from_pretrained(MLP.build(), folder, allow_missing_keys=True)
    assert torch.isfinite(loaded(X)).all()


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_lora_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="LoraConfig.lora_alpha must be a finite number"):
        _lora(lora_alpha=alpha)
    config = _lora()
    config.lora_alpha = alpha  # changed after construction: refused when it is used
    with pytest.raises(ValueError, match="LoraConfig.lora_alpha must be a finite number"):
        get_peft_model(MLP.build(), config)


def test_nonfinite_alpha_in_adapter_config_json_is_refused_naming_the_file(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    text = path.read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{path}: LoraConfig.lora_alpha must be a finite number"):
        PeftModel.from_pretrained(MLP.build(), tmp_path)


# ----------------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "holds a JSON list"),
        (b"null", "holds a JSON null"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not UTF-8|not valid JSON"),
        (b'{"peft_type": "LORA", "r": "eight", "target_modules": ["lin0"]}', "LoraConfig.r must be an integer"),
    ],
)
def test_bad_adapter_config_json_gets_an_error_naming_the_file(tmp_path, content, message):
    model = _trained()
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(content)
    base = MLP.build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    path = str(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match=message) as info:
        PeftModel.from_pretrained(base, tmp_path)
    assert path in str(info.value)
    with pytest.raises(ValueError, match=message):
        PeftConfig.from_pretrained(tmp_path)
    assert _unchanged(base, before)


@pytest.mark.parametrize("damage", ["truncate", "lying-header", "garbage"])
def test_truncated_or_lying_safetensors_gets_an_error_naming_the_file(tmp_path, damage):
    model = _trained()
    model.save_pretrained(tmp_path)
    path = tmp_path / SAFETENSORS_NAME
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "lying-header":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"][1] += 10**6  # claims more bytes than the file has
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = len(raw).to_bytes(8, "little") + raw + data[8 + n :]
    else:
        data = b"\xff" * 64
    path.write_bytes(data)
    base = MLP.build()
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        PeftModel.from_pretrained(base, tmp_path)
    assert str(path) in str(info.value)
    assert not any("lora" in n for n, _ in base.named_parameters())


# ------------------------------------------------------------------------------------- config fields, named
@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: _lora(r=True), "LoraConfig.r"),
        (lambda: _lora(r=2.0), "LoraConfig.r"),
        (lambda: _lora(target_modules=5), "LoraConfig.target_modules"),
        (lambda: _lora(lora_alpha="abc"), "LoraConfig.lora_alpha"),
        (lambda: _lora(lora_dropout=[0.1]), "LoraConfig.lora_dropout"),
        (lambda: _lora(layers_to_transform=2.0), "LoraConfig.layers_to_transform"),
        (lambda: _lora(layers_to_transform=[-1]), "LoraConfig.layers_to_transform"),
        (lambda: _lora(rank_pattern=["lin0", 4]), "LoraConfig.rank_pattern"),
        (lambda: _lora(target_modules="lin[0"), "LoraConfig.target_modules"),
        (lambda: _lora(rank_pattern={"lin(0": 4}), "LoraConfig.rank_pattern"),
        (lambda: _lora(alpha_pattern={"lin0": float("nan")}), "LoraConfig.alpha_pattern"),
        (lambda: _lora(modules_to_save="head"), "LoraConfig.modules_to_save"),
        (lambda: _lora(use_dora="yes"), "LoraConfig.use_dora"),
        (lambda: LoKrConfig(target_modules=["lin0"], decompose_factor=True), "LoKrConfig.decompose_factor"),
        (lambda: LoHaConfig(target_modules=["lin0"], alpha=float("inf")), "LoHaConfig.alpha"),
        (lambda: KronAConfig(target_modules=["lin0"], scale="x"), "KronAConfig.scale"),
        (lambda: AdaLoraConfig(target_modules=["lin0"], total_step=10, orth_reg_weight=None), "AdaLoraConfig.orth_reg_weight"),
        (lambda: AdaLoraConfig(target_modules=["lin0"], total_step=10, beta1="0.5"), "AdaLoraConfig.beta1"),
    ],
)
def test_every_bad_field_is_refused_naming_it(make, field):
    with pytest.raises((TypeError, ValueError)) as info:
        make()
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)  # TypeErrors of fields are ValueErrors too (one except clause)


@pytest.mark.parametrize(
    "config, field",
    [
        (LoraConfig(r=10**9, target_modules=["lin0"]), "LoraConfig.r=1000000000"),
        (LoraConfig(r=4, rank_pattern={"lin0": 10**6}, target_modules=["lin0"]), "LoraConfig.rank_pattern"),
        (LoHaConfig(r=10**9, target_modules=["lin0"]), "LoHaConfig.r"),
        (AdaLoraConfig(init_r=10**7, target_r=2, total_step=10, target_modules=["lin0"]), "AdaLoraConfig.init_r"),
    ],
)
def test_a_rank_beyond_the_layer_size_is_refused_before_allocating(config, field):
    base = MLP.build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="larger than both dimensions of lin0") as info:
        get_peft_model(base, config)  # r=10**9 would allocate ~100 GB: this returns at once
    assert field in str(info.value)
    assert _unchanged(base, before) and all(p.requires_grad for p in base.parameters())


def test_a_rank_above_a_small_layer_is_accepted_with_a_warning_as_in_peft():
    base = MLP.build()
    dims = sorted(base.lin0.weight.shape)
    r = dims[1] + 2  # above both dimensions, factors still tiny: PEFT accepts it (its tests use r=8 on 5 x 1 convs)
    with pytest.warns(UserWarning, match=f"LoraConfig.r={r} is larger than both dimensions of lin0"):
        model = get_peft_model(base, LoraConfig(r=r, target_modules=["lin0"], init_lora_weights=False))
    assert model.base_model.model.lin0.lora_A["default"].weight.shape[0] == r


def test_pissa_niter_is_bounded():
    with pytest.raises(ValueError, match="LoraConfig.init_lora_weights='pissa_niter_100000000'.*can run for days"):
        _lora(init_lora_weights="pissa_niter_100000000")
    assert _lora(init_lora_weights="pissa_niter_16").init_lora_weights == "pissa_niter_16"


def test_config_changed_after_construction_is_checked_at_get_peft_model():
    config = _lora()
    config.r = "8"
    base = MLP.build()
    with pytest.raises(ValueError, match="LoraConfig.r must be an integer"):
        get_peft_model(base, config)
    assert not any("lora" in n for n, _ in base.named_parameters())


def test_valid_peft_style_values_are_still_accepted():
    c = LoraConfig(r=4, lora_alpha=16.0, target_modules={"lin0", "lin1"}, lora_dropout=0, layers_to_transform=0,
                   layers_pattern="layers", rank_pattern={"lin0": 2}, alpha_pattern={"lin1": 0.5},
                   modules_to_save=("head",))
    assert c.target_modules == ["lin0", "lin1"] and c.layers_to_transform == [0]
    model = get_peft_model(MLP.build(), LoraConfig(r=4, lora_alpha=16.0, target_modules=["lin0"]))
    assert get_adapter_state_dict(model.base_model, "default")
