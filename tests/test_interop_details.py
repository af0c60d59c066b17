"""Checkpoint details that make adapters move between peftkit and Hugging Face PEFT: key names, config fields,
sub-folders for named adapters, unknown keys, legacy files, embeddings stored by PEFT."""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from models import MODELS

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")


from contract import _out, noise_adapter as _noise  # noqa: E402


def _keys(folder) -> set[str]:
    return set(load_file(os.path.join(folder, "adapter_model.safetensors")))


def _config(folder) -> dict:
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------------- key names
@pytest.mark.parametrize("name,kw", [
    ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    ("llama", dict(target_modules=["embed_tokens", "v_proj"], use_dora=True)),
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    ("cnn", dict(target_modules=["conv0", "lin"], use_dora=True)),
])
def test_checkpoint_keys_equal_peft(name, kw, tmp_path):
    base = MODELS[name].build()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, **kw))
    ours.add_adapter("second", LoraConfig(r=4, **kw))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **kw))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    our_keys, their_keys = _keys(tmp_path / "ours"), _keys(tmp_path / "theirs")
    # PEFT also stores the base embedding when an embedding is targeted (save_embedding_layers="auto")
    assert our_keys == {k for k in their_keys if ".base_layer." not in k}
    assert _keys(tmp_path / "ours" / "second") == our_keys, "a named adapter's keys carry no adapter name"
    for key in our_keys:
        assert key.startswith("base_model.model.")
        assert ".default" not in key and ".second" not in key
        assert "modules_to_save" not in key and "original_module" not in key
        if "lora_embedding_" in key or "lora_magnitude_vector" in key:
            assert not key.endswith(".weight"), key
    if "embed_tokens" in kw["target_modules"]:
        assert {"base_model.model.model.embed_tokens.lora_embedding_A",
                "base_model.model.model.embed_tokens.lora_embedding_B"} <= our_keys
    if kw.get("use_dora"):
        assert any(k.endswith(".lora_magnitude_vector") for k in our_keys)
    if kw.get("modules_to_save"):
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= our_keys


def test_config_fields_and_all_linear_written_expanded(tmp_path):
    base = MODELS["llama"].build()
    base.config._name_or_path = "some-org/tiny-llama"  # what from_pretrained records
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM",
                                                           rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}))
    model.save_pretrained(tmp_path)
    cfg = _config(tmp_path)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "some-org/tiny-llama"
    assert cfg["inference_mode"] is True
    assert isinstance(cfg["target_modules"], list) and len(cfg["target_modules"]) == 14
    assert all(t.startswith("model.layers.") for t in cfg["target_modules"]), "all-linear is written as module names"
    assert model.peft_config["default"].inference_mode is False, "saving must not freeze the live adapter"
    # peft reads every field the same way
    ref_cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(ref_cfg, peft.LoraConfig)
    assert sorted(ref_cfg.target_modules) == sorted(cfg["target_modules"])
    assert (ref_cfg.r, ref_cfg.lora_alpha, ref_cfg.rank_pattern, ref_cfg.alpha_pattern) == (4, 8, {"q_proj": 2}, {"v_proj": 3})
    assert ref_cfg.task_type == "CAUSAL_LM" and ref_cfg.base_model_name_or_path == "some-org/tiny-llama"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert type(theirs).__name__ == "PeftModelForCausalLM"
    ours_ranks = {n: m.r["default"] for n, m in model.named_modules() if isinstance(m, peftkit.engine.layer.AdapterLayer)}
    theirs_ranks = {n: m.r["default"] for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours_ranks == theirs_ranks


def test_peft_all_linear_checkpoint_loads(tmp_path):
    spec = MODELS["gpt2"]
    base = spec.build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear")).eval()
    _noise(theirs, "default", 1)
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_out(spec, ours), _out(spec, theirs), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- config keys
def test_unknown_config_keys_warn_but_peft_null_keys_do_not(tmp_path, caplog):
    base = MODELS["llama"].build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.save_pretrained(str(tmp_path))
    written = _config(tmp_path)
    # every key PEFT 0.21 writes is a LoraConfig field here (implemented, or refused by name when set)
    assert set(written) <= set(LoraConfig.__dataclass_fields__), set(written) - set(LoraConfig.__dataclass_fields__)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == [], "peft's unused keys must load silently"

    written.update({"future_feature": {"mode": "fancy"}, "use_quantum": True})
    with open(tmp_path / "adapter_config.json", "w", encoding="utf-8") as fh:
        json.dump(written, fh)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "future_feature" in warnings[0] and "use_quantum" in warnings[0]

    # a PEFT LoraConfig field of a feature peftkit lacks, in use: refused by name (loading it would change outputs)
    written["use_bdlora"] = {"lora_a_is_blockdiagonal": True}
    with open(tmp_path / "adapter_config.json", "w", encoding="utf-8") as fh:
        json.dump(written, fh)
    with pytest.raises(ValueError, match="use_bdlora.*not supported"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_config_without_peft_type_or_with_unknown_method_is_a_clear_error(tmp_path):
    base = MODELS["mlp"].build()
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["lin0"])).save_pretrained(tmp_path)
    cfg = _config(tmp_path)
    for bad, message in ((dict(cfg, peft_type="FANCY_NEW_METHOD"), "Unknown method 'FANCY_NEW_METHOD'"),
                         ({k: v for k, v in cfg.items() if k != "peft_type"}, "no 'peft_type'")):
        with open(tmp_path / "adapter_config.json", "w", encoding="utf-8") as fh:
            json.dump(bad, fh)
        with pytest.raises(ValueError, match=message):
            PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


# ---------------------------------------------------------------------------------------------- task types
@pytest.mark.parametrize("name,task,targets,expected", [
    ("llama", "CAUSAL_LM", ["q_proj"], "PeftModelForCausalLM"),
    ("t5", "SEQ_2_SEQ_LM", ["q", "v"], "PeftModelForSeq2SeqLM"),
    ("bert", "SEQ_CLS", ["query", "value"], "PeftModelForSequenceClassification"),
])
def test_peft_checkpoint_with_task_type_loads_as_the_right_subclass(name, task, targets, expected, tmp_path):
    spec = MODELS[name]
    base = spec.build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets, task_type=task)).eval()
    _noise(theirs, "default", 2)
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(ours).__name__ == expected and type(theirs).__name__ == expected
    torch.testing.assert_close(_out(spec, ours), _out(spec, theirs), atol=1e-5, rtol=0)
    if task == "SEQ_CLS":  # peft trained and saved the classifier head; ours loads it
        assert "base_model.model.classifier.weight" in _keys(tmp_path)
        assert ours.peft_config["default"].modules_to_save == ["classifier"] or "classifier" in ours.peft_config["default"].modules_to_save


# ------------------------------------------------------------------------------------------ named adapters
def test_several_adapters_move_both_ways(tmp_path):
    spec = MODELS["llama"]
    base = spec.build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
    _noise(theirs, "default", 1)
    _noise(theirs, "b", 2)
    expected = {}
    for name in ("default", "b"):
        theirs.set_adapter(name)
        expected[name] = _out(spec, theirs)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert sorted(os.listdir(tmp_path / "theirs")) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "b"]

    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    ours.load_adapter(tmp_path / "theirs", "b", subfolder="b")
    for name in ("default", "b"):
        ours.set_adapter(name)
        torch.testing.assert_close(_out(spec, ours), expected[name], atol=1e-5, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    back.load_adapter(str(tmp_path / "ours" / "b"), "b")
    for name in ("default", "b"):
        back.set_adapter(name)
        torch.testing.assert_close(_out(spec, back), expected[name], atol=1e-5, rtol=0)
    # peft's own way of loading a named adapter from a sub-folder
    only_b = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"), subfolder="b", adapter_name="b")
    torch.testing.assert_close(_out(spec, only_b), expected["b"], atol=1e-5, rtol=0)


def test_peft_legacy_bin_checkpoint_loads(tmp_path):
    spec = MODELS["bert"]
    base = spec.build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"])).eval()
    _noise(theirs, "default", 3)
    theirs.save_pretrained(str(tmp_path), safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin") and not os.path.isfile(tmp_path / "adapter_model.safetensors")
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_out(spec, ours), _out(spec, theirs), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- embeddings
def test_peft_checkpoint_with_base_embedding_loads_silently_and_uses_it(tmp_path, caplog):
    """PEFT stores the base embedding next to an embedding adapter (and when the vocabulary was resized) and loads it
    into the base model; so do we. A stored embedding of another size names the key and says what to do."""
    spec = MODELS["llama"]
    base = spec.build()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])).eval()
    _noise(theirs, "default", 4)
    with torch.no_grad():  # e.g. new token rows that were trained before
        theirs.base_model.model.model.embed_tokens.base_layer.weight[-3:].normal_()
    theirs.save_pretrained(str(tmp_path))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in _keys(tmp_path)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(_out(spec, ours), _out(spec, reference), atol=1e-5, rtol=0)
    torch.testing.assert_close(_out(spec, ours), _out(spec, theirs), atol=1e-5, rtol=0)

    smaller = spec.build()
    smaller.resize_token_embeddings(90)
    with pytest.raises(ValueError, match=r"embed_tokens\.base_layer\.weight.*\(96, 32\).*\(90, 32\).*resize_token_embeddings\(96\)"):
        PeftModel.from_pretrained(smaller, tmp_path)
    assert not any(isinstance(m, peftkit.engine.layer.AdapterLayer) for m in smaller.modules())
