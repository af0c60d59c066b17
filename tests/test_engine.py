"""The engine's behaviour beyond the method contract: errors, atomic and safe files, managing several adapters,
task-specific models, parameter counts. LoRA is the method used, as the reference user of the engine."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
import torch.nn as nn

from models import MODELS, VIT_QV

import peftkit
from peftkit import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from peftkit.engine.layer import AdapterLayer, ModulesToSaveWrapper


# ------------------------------------------------------------------------------------------------------ helpers
from contract import _out, noise_adapter as _noise  # noqa: E402


def _llama_with_two(tmp=None):
    spec = MODELS["llama"]
    base = spec.build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    _noise(model, "default", 1)
    _noise(model, "b", 2)
    return spec, base, model.eval()


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same_params(module, before):
    now = dict(module.named_parameters())
    return set(now) == set(before) and all(
        torch.allclose(now[n].detach(), before[n], rtol=0, atol=0, equal_nan=True) for n in before
    )


class OneLinear(nn.Module):
    """A purely linear model: adapters' effects add up exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(x)


# ------------------------------------------------------------------------------------------------------ errors
def test_target_modules_matching_nothing_lists_closest_names():
    base = MODELS["llama"].build()
    with pytest.raises(ValueError) as info:
        get_peft_model(base, LoraConfig(target_modules=["q_prj", "vproj"]))
    msg = str(info.value)
    assert "matched no module" in msg and "q_prj" in msg
    closest = re.search(r"Closest module names: ([^.]*)\.", msg).group(1).split(", ")
    assert "q_proj" in closest and "v_proj" in closest
    assert not any(isinstance(m, AdapterLayer) for m in base.modules()), "a failed get_peft_model changed the model"


def test_target_modules_regex_matching_nothing_and_exclusions_are_named():
    base = MODELS["llama"].build()
    with pytest.raises(ValueError, match=r"exclude_modules"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"within layers \[7\]"):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    # the error lists the model's own layers, never the internals of already-wrapped layers
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError) as info:
        model.add_adapter("x", LoraConfig(target_modules=["nothing_here"]))
    assert "base_layer" not in str(info.value) and "lora_A" not in str(info.value)
    assert "q_proj" in str(info.value)


@pytest.mark.parametrize("r", [0, -1])
def test_rank_must_be_positive(r):
    with pytest.raises(ValueError, match="positive"):
        LoraConfig(r=r)
    with pytest.raises(ValueError, match="positive"):
        LoraConfig(r=4, rank_pattern={"q_proj": r})


def test_unknown_bias_and_init_are_rejected():
    with pytest.raises(ValueError, match=r"'none', 'all', 'lora_only'"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match=r"init_lora_weights='olora_typo'.*'gaussian'"):
        LoraConfig(init_lora_weights="olora_typo")
    with pytest.raises(ValueError, match="task_type"):
        LoraConfig(task_type="SPEECH")


def test_checkpoint_that_does_not_fit_names_key_and_shapes_and_leaves_model_unchanged(tmp_path):
    spec = MODELS["llama"]
    model = get_peft_model(spec.build(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    other.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a flag the user set must survive
    before, flags = _params(other), {n: p.requires_grad for n, p in other.named_parameters()}
    expected = _out(spec, other)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(other, tmp_path)
    msg = str(info.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "(4, 32)" in msg and "(4, 64)" in msg
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in other.modules())
    assert _same_params(other, before)
    assert {n: p.requires_grad for n, p in other.named_parameters()} == flags
    assert torch.equal(_out(spec, other), expected)


def test_load_adapter_that_does_not_fit_leaves_peft_model_unchanged(tmp_path):
    spec, base, model = _llama_with_two()
    other = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    other.save_pretrained(tmp_path)
    before, expected = _params(model), _out(spec, model)
    structure = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \(4, 32\).*expects \(8, 32\)"):
        model.load_adapter(tmp_path, "c", config=LoraConfig(r=8, target_modules=["q_proj", "k_proj"]))
    assert list(model.peft_config) == ["default", "b"]
    assert [type(m).__name__ for m in model.modules()] == structure, "k_proj stayed wrapped after a failed load"
    assert _same_params(model, before)
    assert torch.equal(_out(spec, model), expected)


def test_duplicate_and_unknown_adapter_names(tmp_path):
    spec, base, model = _llama_with_two()
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path / "b", "b")  # an existing name: loads into it, as Hugging Face PEFT does
    assert list(model.peft_config) == ["default", "b"]
    with pytest.raises(ValueError, match=r"No adapter named 'nope'; this model has: default, b"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        model.set_adapter(["default", "nope"])
    assert model.active_adapter == "default", "a failed set_adapter changed the active adapter"
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match="No adapter named 'nope' to save"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        model.merge_adapter(["nope"])
    assert list(model.peft_config) == ["default", "b"]


def test_adapter_names_errors():
    spec, base, model = _llama_with_two()
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        _out(spec, model, adapter_names=["default", "nope", "__base__"])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        _out(spec, model, adapter_names=["default", "b"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        _out(spec, model, adapter_names=["default", "b", "b"])
    model.unmerge_adapter()
    # after the errors the model still runs normally
    assert torch.isfinite(_out(spec, model)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_weights_and_changes_nothing(bad):
    spec, base, model = _llama_with_two()
    model.set_adapter(["default", "b"])
    # break the LAST adapter layer, so that earlier layers would already be merged by a layer-by-layer merge
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.o_proj.lora_B["b"].weight[0, 0] = bad
    before = _params(model.get_base_model())
    with pytest.raises(ValueError, match=r"'b' would put NaN or inf into the weights of model\.layers\.1\.self_attn\.o_proj"):
        model.merge_adapter(safe_merge=True)
    assert all(not layer.merged for _, layer in model.base_model.adapter_layers())
    assert _same_params(model.get_base_model(), before)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True)
    assert _same_params(model.get_base_model(), before)
    assert any(isinstance(m, AdapterLayer) for m in model.modules()), "failed merge_and_unload unwrapped the model"
    # the healthy adapter alone still merges safely
    model.set_adapter("default")
    unmerged = _out(spec, model)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(_out(spec, model), unmerged, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ atomic, safe files
def test_save_is_atomic_when_the_weights_writer_fails(tmp_path, monkeypatch):
    spec, base, model = _llama_with_two()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    old_bytes, old_config = weights.read_bytes(), (tmp_path / "adapter_config.json").read_bytes()
    _noise(model, "default", 5)

    import safetensors.torch

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:  # half a file, then the disk fills up
            fh.write(b"\x00" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path)
    assert weights.read_bytes() == old_bytes
    assert (tmp_path / "adapter_config.json").read_bytes() == old_config
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.startswith(".tmp")]
    assert leftovers == []


def test_save_is_atomic_when_the_config_writer_fails(tmp_path, monkeypatch):
    spec, base, model = _llama_with_two()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    old = config_file.read_bytes()
    model.peft_config["default"].lora_dropout = 0.25

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(peftkit.engine.io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        model.save_pretrained(tmp_path)
    assert config_file.read_bytes() == old
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


class _Payload:
    """Unpickling this would create a marker file: the test checks that it never exists."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_legacy_bin_with_pickled_code_is_refused(tmp_path):
    spec = MODELS["llama"]
    model = get_peft_model(spec.build(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    state = peftkit.get_adapter_state_dict(model.base_model, "default")
    os.remove(tmp_path / "adapter_model.safetensors")
    marker = tmp_path / "code_ran.txt"
    torch.save({**state, "extra": _Payload(str(marker))}, tmp_path / "adapter_model.bin")
    victim = spec.build()
    with pytest.raises(ValueError, match="Refusing to load .*adapter_model.bin"):
        PeftModel.from_pretrained(victim, tmp_path)
    assert not marker.exists(), "loading executed pickled code"
    assert not any(isinstance(m, AdapterLayer) for m in victim.modules())


def test_legacy_bin_of_plain_tensors_loads_with_weights_only(tmp_path, monkeypatch):
    spec, base, model = _llama_with_two()
    expected = _out(spec, model)
    state = peftkit.get_adapter_state_dict(model.base_model, "default")
    model.peft_config["default"].save_pretrained(tmp_path)
    torch.save(dict(state), tmp_path / "adapter_model.bin")
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert calls == [True]
    model.set_adapter("default")
    assert torch.equal(_out(spec, loaded), expected)


def test_local_folder_named_like_a_hub_id_and_missing_paths(tmp_path, monkeypatch):
    spec, base, model = _llama_with_two()
    monkeypatch.chdir(tmp_path)
    model.save_pretrained("my-org/my-adapter")  # a relative path that looks like a hub id
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), "my-org/my-adapter")
    assert torch.equal(_out(spec, loaded), _out(spec, model))
    assert PeftConfig.from_pretrained("my-org/my-adapter").r == 4
    with pytest.raises(FileNotFoundError, match="No such folder: '/definitely/not/here'"):
        PeftModel.from_pretrained(copy.deepcopy(base), "/definitely/not/here")
    with pytest.raises(FileNotFoundError, match="No such folder"):
        PeftModel.from_pretrained(copy.deepcopy(base), "./not-here")
    with pytest.raises(FileNotFoundError, match="No sub-folder 'zz'"):
        PeftModel.from_pretrained(copy.deepcopy(base), "my-org/my-adapter", subfolder="zz")
    with pytest.raises(FileNotFoundError, match="is a file"):
        PeftModel.from_pretrained(copy.deepcopy(base), "my-org/my-adapter/adapter_config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No adapter_config.json in empty \(it holds: nothing\)"):
        PeftModel.from_pretrained(copy.deepcopy(base), "empty")
    # a hub id that is not cached, with the hub offline (conftest sets HF_HUB_OFFLINE=1): clear, no traceback soup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"Cannot load 'no-such-org/no-such-adapter'"):
        PeftModel.from_pretrained(copy.deepcopy(base), "no-such-org/no-such-adapter")


def test_get_peft_model_twice_on_the_same_model_does_not_overwrite_the_first():
    spec = MODELS["llama"]
    base = spec.build()
    first = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    _noise(first, "default", 1)
    expected = _out(spec, first)
    for config in (LoraConfig(r=8, target_modules=["q_proj"]), LoraConfig(r=8, target_modules=["nothing_matches"])):
        with pytest.raises(ValueError, match="already holds an adapter named 'default'.*get_peft_model called twice"):
            get_peft_model(base, config)
    assert first.base_model.model.model.layers[0].self_attn.q_proj.r == {"default": 4}
    assert torch.equal(_out(spec, first), expected)


@pytest.mark.parametrize("name", ["a.b", "../up", "x/y", "", "__base__"])
def test_adapter_names_that_cannot_be_keys_or_folders_are_refused(name):
    with pytest.raises(ValueError, match="Invalid adapter name"):
        get_peft_model(MODELS["mlp"].build(), LoraConfig(r=2, target_modules=["lin0"]), adapter_name=name)


def test_wrapping_a_peft_model_again_is_refused(tmp_path):
    model = get_peft_model(MODELS["mlp"].build(), LoraConfig(r=2, target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="add_adapter"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["lin1"]))
    with pytest.raises(ValueError, match="load_adapter"):
        PeftModel.from_pretrained(model, tmp_path)


# ------------------------------------------------------------------------------------------- several adapters
def test_add_adapter_is_not_active_until_set_adapter():
    spec, base, model = _llama_with_two()
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable), "a new adapter must not train until activated"
    out_default = _out(spec, model)
    model.set_adapter("b")
    assert model.active_adapter == "b"
    out_b = _out(spec, model)
    assert (out_default - out_b).abs().max() > 1e-3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)
    model.set_adapter("default")
    assert torch.equal(_out(spec, model), out_default)


def test_several_active_adapters_add_up():
    base = OneLinear().eval()
    x = torch.randn(5, 16)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["proj"]))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=7, target_modules=["proj"]))
    _noise(model, "default", 1)
    _noise(model, "b", 2)
    with torch.no_grad():
        y0 = base(x)
        ya = model(x)
        model.set_adapter("b")
        yb = model(x)
        model.set_adapter(["default", "b"])
        assert model.active_adapter == ["default", "b"] and model.active_adapters == ["default", "b"]
        both = model(x)
        torch.testing.assert_close(both, y0 + (ya - y0) + (yb - y0), atol=1e-5, rtol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(x), both, atol=1e-5, rtol=0)
        layer = model.base_model.model.proj
        assert sorted(layer.merged_adapters) == ["b", "default"]
        model.unmerge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, base.proj.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), both, atol=1e-6, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.model.proj.lora_{s}.{a}.weight" for s in "AB" for a in ("default", "b")
    }


def test_delete_adapter():
    spec, base, model = _llama_with_two()
    out_default = _out(spec, model)
    model.set_adapter("b")
    model.delete_adapter("b")
    assert list(model.peft_config) == ["default"]
    assert model.active_adapter == "default", "deleting the active adapter activates a remaining one"
    assert not any(".b." in n for n, _ in model.named_parameters())
    assert torch.equal(_out(spec, model), out_default)
    model.delete_adapter("default")
    assert model.peft_config == {} and model.active_adapters == []
    torch.testing.assert_close(_out(spec, model), _out(spec, base), atol=1e-6, rtol=0)
    model.add_adapter("again", LoraConfig(r=2, target_modules=["q_proj"]))  # the model is usable again
    assert model.active_adapter == "again"


def test_disable_adapter_context_restores_even_after_an_error():
    spec, base, model = _llama_with_two()
    out_adapted, out_base = _out(spec, model), _out(spec, base)
    with model.disable_adapter():
        assert torch.equal(_out(spec, model), out_base)
    assert torch.equal(_out(spec, model), out_adapted)
    with pytest.raises(RuntimeError):
        with model.disable_adapter():
            raise RuntimeError("boom")
    assert torch.equal(_out(spec, model), out_adapted)


def test_merge_and_unload_selected_adapters_safely():
    spec, base, model = _llama_with_two()
    model.set_adapter("b")
    out_b = _out(spec, model)
    model.set_adapter("default")
    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True, adapter_names=["b"])
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert type(merged) is type(base)
    torch.testing.assert_close(_out(spec, merged), out_b, atol=1e-5, rtol=0)
    assert set(merged.state_dict()) == set(base.state_dict())


def test_merge_and_unload_uses_the_merged_adapters_own_head():
    spec = MODELS["bert"]
    base = spec.build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    _noise(model, "default", 1)
    _noise(model, "b", 2)
    model.eval()
    model.set_adapter("b")
    out_b = _out(spec, model)
    model.set_adapter("default")
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["b"])
    torch.testing.assert_close(_out(spec, merged), out_b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="own trained copy of classifier"):
        copy.deepcopy(model).merge_and_unload(adapter_names=["default", "b"])


def test_unload_returns_the_original_model():
    spec = MODELS["bert"]
    base = spec.build()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    _noise(model, "default", 3)
    assert (_out(spec, model) - _out(spec, reference)).abs().max() > 1e-3
    unloaded = model.unload()
    assert unloaded is base
    assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in unloaded.modules())
    assert torch.equal(_out(spec, unloaded), _out(spec, reference))
    assert set(unloaded.state_dict()) == set(reference.state_dict())


def test_save_and_load_several_adapters(tmp_path):
    spec, base, model = _llama_with_two()
    model.add_adapter("c", LoraConfig(r=3, target_modules=["k_proj"]))
    _noise(model, "c", 3)
    outs = {}
    for name in ("default", "b", "c"):
        model.set_adapter(name)
        outs[name] = _out(spec, model)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "b", "c"]
    for sub in ("b", "c"):
        assert sorted(os.listdir(tmp_path / sub)) == ["adapter_config.json", "adapter_model.safetensors"]

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.load_adapter(tmp_path, "c", subfolder="c")
    assert loaded.active_adapter == "default", "load_adapter must not switch the active adapter"
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded for inference: nothing trains"
    for name in ("default", "b", "c"):
        loaded.set_adapter(name)
        assert torch.equal(_out(spec, loaded), outs[name]), name
    # as in PEFT, set_adapter makes the adapter it activates trainable (inference_mode=True keeps it frozen)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, _ in loaded.named_parameters() if ".c." in n}

    selected = tmp_path / "selected"
    model.save_pretrained(selected, selected_adapters=["b"])
    assert sorted(os.listdir(selected)) == ["README.md", "b"]
    model.save_pretrained(tmp_path / "sel2", selected_adapters=["default", "c"])
    assert sorted(os.listdir(tmp_path / "sel2")) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "c"]


def test_from_pretrained_named_trainable_adapter(tmp_path):
    spec, base, model = _llama_with_two()
    model.set_adapter("b")
    out_b = _out(spec, model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, subfolder="b", adapter_name="x", is_trainable=True)
    assert list(loaded.peft_config) == ["x"] and loaded.active_adapter == "x"
    assert loaded.peft_config["x"].inference_mode is False
    assert torch.equal(_out(spec, loaded), out_b)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and ".x." in n for n in trainable)
    # it really trains
    kw = spec.inputs(4)
    opt = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = spec.loss(loaded, kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_inference_mode_config_has_no_trainable_parameters():
    model = get_peft_model(MODELS["llama"].build(), LoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 0 and total > 0
    model.add_adapter("t", LoraConfig(r=4, target_modules=["q_proj"]))
    model.set_adapter("t")
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * 4 * 32  # 2 layers x (A + B) x r x 32
    model.set_adapter("default", inference_mode=True)
    assert model.get_nb_trainable_parameters()[0] == 0
    model.set_adapter("default")  # as in PEFT, activating an adapter makes it trainable unless inference_mode=True
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * 4 * 32


# --------------------------------------------------------------------------------------------------- task types
def _bert(cls_name: str, num_labels: int = 3):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
    return getattr(transformers, cls_name)(cfg).eval()


@pytest.mark.parametrize(
    "task,build,cls",
    [
        ("CAUSAL_LM", lambda: MODELS["llama"].build(), peftkit.PeftModelForCausalLM),
        ("SEQ_2_SEQ_LM", lambda: MODELS["t5"].build(), peftkit.PeftModelForSeq2SeqLM),
        ("SEQ_CLS", lambda: _bert("BertForSequenceClassification"), peftkit.PeftModelForSequenceClassification),
        ("TOKEN_CLS", lambda: _bert("BertForTokenClassification"), peftkit.PeftModelForTokenClassification),
        ("QUESTION_ANS", lambda: _bert("BertForQuestionAnswering", 2), peftkit.PeftModelForQuestionAnswering),
        ("FEATURE_EXTRACTION", lambda: _bert("BertModel"), peftkit.PeftModelForFeatureExtraction),
    ],
)
def test_task_type_selects_the_subclass(task, build, cls, tmp_path):
    base = build()
    targets = {"CAUSAL_LM": ["q_proj", "v_proj"], "SEQ_2_SEQ_LM": ["q", "v"]}.get(task, ["query", "value"])
    for task_value in (task, TaskType(task)):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, task_type=task_value))
        assert type(model) is cls
    heads = {"SEQ_CLS": "classifier", "TOKEN_CLS": "classifier", "QUESTION_ANS": "qa_outputs"}
    trained_head = [n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    if task in heads:
        assert trained_head and all(heads[task] in n for n in trained_head), "the task head must train, as in PEFT"
    else:
        assert trained_head == []
    model.save_pretrained(tmp_path)
    assert type(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)) is cls
    assert type(cls.from_pretrained(copy.deepcopy(base), tmp_path)) is cls


def test_seq_cls_trains_and_saves_the_classifier_head(tmp_path):
    spec = MODELS["bert"]
    base = spec.build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert model.peft_config["default"].modules_to_save == ["classifier"]
    kw = spec.inputs(6)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(3):
        loss = spec.loss(model, kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head = model.base_model.model.classifier
    assert not torch.equal(head.modules_to_save["default"].weight, base.classifier.weight), "head did not train"
    assert torch.equal(head.original_module.weight, base.classifier.weight), "the original head must stay frozen"
    model.eval()
    expected = _out(spec, model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(_out(spec, loaded), expected)


@pytest.mark.parametrize("name,targets,task", [("llama", ["q_proj", "v_proj"], "CAUSAL_LM"), ("t5", ["q", "v"], "SEQ_2_SEQ_LM")])
def test_generate_matches_the_base_model_and_follows_the_adapter(name, targets, task):
    spec = MODELS[name]
    base = spec.build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, task_type=task))
    ids = spec.inputs(2)["input_ids"][:, :5]
    gen = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, **gen), base.generate(input_ids=ids, **gen))
        _noise(model, "default", 4, scale=1.0)
        merged = copy.deepcopy(model).merge_and_unload()
        assert torch.equal(model.generate(input_ids=ids, **gen), merged.generate(input_ids=ids, **gen))


# ------------------------------------------------------------------------------------------- parameter counts
def test_print_trainable_parameters_vit_base_exact(capsys):
    from transformers import ViTConfig, ViTForImageClassification

    with torch.device("meta"):  # counting needs no memory: the engine works on meta-device models
        vit = ViTForImageClassification(ViTConfig(num_labels=101))
    config = LoraConfig(r=16, lora_alpha=16, target_modules=VIT_QV, lora_dropout=0.1, bias="none",
                        modules_to_save=["classifier"])
    model = get_peft_model(vit, config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 667,493 || all params: 86,543,818 || trainable%: 0.7713\n"
    assert model.get_nb_trainable_parameters() == (667_493, 86_543_818)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_print_trainable_parameters_equals_peft(capsys):
    peft = pytest.importorskip("peft")
    base = MODELS["gpt2"].build()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"))
    ours.print_trainable_parameters()
    mine = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert mine == capsys.readouterr().out
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_meta_device_model_gets_meta_adapters_and_materialises(tmp_path):
    spec = MODELS["llama"]
    real = spec.build()
    trained = get_peft_model(copy.deepcopy(real), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _noise(trained, "default", 6)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(real.config)
    model = get_peft_model(skeleton, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.get_nb_trainable_parameters() == trained.get_nb_trainable_parameters()
    trained.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="meta device"):  # not a silent no-op load
        model.load_adapter(tmp_path, "x")
    assert list(model.peft_config) == ["default"]
    model = model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())
    trained_buffers = dict(trained.named_buffers())  # non-persistent buffers (rotary inv_freq) are not in state_dict
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(trained_buffers[name])
    assert torch.equal(_out(spec, model.eval()), _out(spec, trained.eval()))


def test_get_peft_model_does_not_touch_base_weights(monkeypatch):
    """Creating adapters never re-initialises (or even writes) the base weights: they are about to be replaced by
    pretrained ones anyway, and on large models that initialisation is the slow part."""
    spec = MODELS["llama"]
    base = spec.build()
    before = _params(base)
    versions = {n: p._version for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    after = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
    assert set(after) == set(before)
    assert all(torch.equal(after[n].detach(), before[n]) for n in before)
    assert all(after[n]._version == versions[n] for n in before), "a base weight was written in place"


def test_exports_for_the_readme_quickstart():
    for name in ("LoraConfig", "get_peft_model", "PeftModel", "PeftConfig", "TaskType", "PeftType"):
        assert name in peftkit.__all__ and hasattr(peftkit, name)
    namespace: dict = {}
    exec("from peftkit import LoraConfig, get_peft_model, PeftModel, PeftConfig, TaskType", namespace)
    assert namespace["TaskType"].CAUSAL_LM == "CAUSAL_LM"


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    """The README's quickstart, verbatim except for the ViT size (a tiny config keeps the test fast)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    quickstart = next(b for b in blocks if "print_trainable_parameters" in b)
    assert quickstart.count("ViTConfig(num_labels=101)") == 2
    small = ("ViTConfig(num_labels=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, "
             "intermediate_size=37, image_size=16, patch_size=4)")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    if VIT_QV != ["q_proj", "v_proj"]:  # transformers < 5.9 names them query/value (as the README's comment says)
        assert '["q_proj", "v_proj"]' in quickstart
        quickstart = quickstart.replace('["q_proj", "v_proj"]', repr(VIT_QV))
    exec(quickstart.replace("ViTConfig(num_labels=101)", small), namespace)
    printed = capsys.readouterr().out
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n", printed)
    assert os.path.isfile(tmp_path / "vit-lora" / "adapter_model.safetensors")
    assert not any(isinstance(m, AdapterLayer) for m in namespace["merged"].modules())


def test_creation_benchmark_script_runs(monkeypatch, capsys):
    """benchmarks/creation_speed.py (get_peft_model time, peftkit vs peft) on a tiny size: it prints its ratio."""
    pytest.importorskip("peft")
    import runpy
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "creation_speed.py")
    monkeypatch.setattr(sys, "argv", [script, "--hidden", "64", "--layers", "2", "--repeats", "1", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    out = capsys.readouterr().out
    assert re.search(r"ratio peftkit/peft \d+\.\d\d", out)
    assert "meta-device model" in out


# ------------------------------------------------------------------------------------------ transformers.Trainer
@pytest.mark.parametrize("task", ["SEQ_CLS", None])
def test_trainer_keeps_input_columns_and_finds_labels(task, tmp_path):
    """transformers.Trainer drops dataset columns its model's forward does not name and reads label names from the
    model class; it sees through Hugging Face PEFT's classes only, so ours must expose the right signatures."""
    transformers = pytest.importorskip("transformers")
    spec = MODELS["bert"]
    model = get_peft_model(spec.build(), LoraConfig(r=4, target_modules=["query", "value"], task_type=task,
                                                   modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 96, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "token_type_ids": torch.zeros(8, dtype=torch.long), "labels": i % 3, "row_id": i} for i in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-2,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,  # remove_unused_columns stays at its default, True
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    if task == "SEQ_CLS":
        assert trainer.label_names == ["labels"]
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
    if task == "SEQ_CLS":
        prediction = trainer.predict(data)
        assert prediction.label_ids is not None and prediction.predictions.shape == (16, 3)
