"""AdapterHub checkpoints: folders written by ``adapters`` 1.3 (tests/fixtures/adapterhub, see make_fixtures.py)
load with PeftModel.from_pretrained and give AdapterHub's outputs; our export has AdapterHub's layout."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.engine import adapterhub

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "adapterhub")
FOLDERS = sorted(d for d in os.listdir(HERE) if os.path.isdir(os.path.join(HERE, d)) and not d.startswith("base-"))
COUNTS = json.load(open(os.path.join(HERE, "counts.json")))
_BASES: dict = {}


def base_model(family: str):
    if family not in _BASES:
        import transformers

        meta = json.load(open(os.path.join(HERE, "models.json")))[family]
        _BASES[family] = getattr(transformers, meta["class"]).from_pretrained(os.path.join(HERE, f"base-{family}")).eval()
    return copy.deepcopy(_BASES[family])


def reference(folder: str):
    ref = load_file(os.path.join(HERE, folder, "reference.safetensors"))
    out = ref.pop("output")
    return ref, out


def test_fixtures_present_and_small():
    assert len(FOLDERS) >= 20
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(HERE) for f in fs)
    assert total < 2_000_000


@pytest.mark.parametrize("folder", FOLDERS)
def test_import_gives_adapterhubs_outputs(folder):
    family = folder.split("-", 1)[0]
    path = os.path.join(HERE, folder)
    assert adapterhub.is_adapterhub_folder(path)
    inputs, expected = reference(folder)
    base = base_model(family)
    with torch.no_grad():
        base_out = base(**inputs).last_hidden_state
    assert (base_out - expected).abs().max() > 1e-3, "fixture adapter has no effect"
    model = peftkit.PeftModel.from_pretrained(base, path)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    diff = (out - expected).abs().max().item()
    assert diff <= 1e-5, f"{folder}: max abs diff to AdapterHub {diff:.3g}"
    # the same number of trainable parameters as AdapterHub when loaded trainable
    trainable = peftkit.PeftModel.from_pretrained(base_model(family), path, is_trainable=True)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == COUNTS[folder]


def test_load_adapter_adds_an_adapterhub_adapter_next_to_ours():
    inputs, expected = reference("bert-double_seq_bn")
    model = peftkit.get_peft_model(base_model("bert"), peftkit.SeqBnConfig())
    model.load_adapter(os.path.join(HERE, "bert-double_seq_bn"), "ah")
    model.set_adapter("ah")
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    assert (out - expected).abs().max() <= 1e-5
    # one adapter per row: row 0 AdapterHub's, row 1 the base
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["ah", "__base__"]).last_hidden_state
        with model.disable_adapter():
            plain = model(**inputs).last_hidden_state
    assert (mixed[0] - expected[0]).abs().max() <= 1e-5
    assert (mixed[1] - plain[1]).abs().max() <= 1e-6


def test_unsupported_adapterhub_config_is_refused_by_name(tmp_path):
    meta = json.load(open(os.path.join(HERE, "bert-seq_bn", "adapter_config.json")))
    meta["config"] = {"architecture": "lora", "r": 8}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    base = base_model("bert")
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="lora"):
        peftkit.PeftModel.from_pretrained(base, tmp_path)
    meta["config"] = {"architecture": "prefix_tuning", "prefix_length": 30, "flat": True}  # (the hybrids' prefix)
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="flat=True"):
        peftkit.PeftModel.from_pretrained(base, tmp_path)
    meta["config"] = dict(json.load(open(os.path.join(HERE, "bert-seq_bn", "adapter_config.json")))["config"],
                          stochastic_depth=0.1)
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="stochastic_depth"):
        peftkit.PeftModel.from_pretrained(base, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_wrong_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model type 'llama'"):
        peftkit.PeftModel.from_pretrained(base_model("bert"), os.path.join(HERE, "llama-seq_bn"))


def test_pickle_with_code_is_refused(tmp_path):
    import pickle

    meta = open(os.path.join(HERE, "bert-double_seq_bn", "adapter_config.json")).read()
    (tmp_path / "adapter_config.json").write_text(meta)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "pytorch_adapter.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(ValueError, match="pickled objects"):
        peftkit.PeftModel.from_pretrained(base_model("bert"), tmp_path)


@pytest.mark.parametrize("folder", ["bert-seq_bn", "bert-compacter", "llama-bn_custom", "t5-compacter++", "vit-par_bn"])
def test_export_round_trip(folder, tmp_path):
    """Export writes AdapterHub's keys and config; re-importing it gives the same outputs."""
    family = folder.split("-", 1)[0]
    inputs, expected = reference(folder)
    model = peftkit.PeftModel.from_pretrained(base_model(family), os.path.join(HERE, folder))
    model.save_pretrained(tmp_path, format="adapterhub")
    theirs = load_file(os.path.join(HERE, folder, "adapter.safetensors")) if os.path.isfile(
        os.path.join(HERE, folder, "adapter.safetensors")) else torch.load(
        os.path.join(HERE, folder, "pytorch_adapter.bin"), weights_only=True)
    ours = load_file(tmp_path / "adapter.safetensors")
    strip = lambda k: k.split(".", 1)[1] if k.startswith(f"{family}.") else k  # noqa: E731
    assert {strip(k).replace(".a.", ".default.") for k in theirs if "shared_parameters" not in k} <= {
        strip(k) for k in ours}
    meta = json.load(open(tmp_path / "adapter_config.json"))
    ref_meta = json.load(open(os.path.join(HERE, folder, "adapter_config.json")))
    assert meta["config"] == ref_meta["config"]
    assert meta["version"].startswith("adapters.") and meta["model_class"] == ref_meta["model_class"]
    back = peftkit.PeftModel.from_pretrained(base_model(family), tmp_path)
    with torch.no_grad():
        assert (back(**inputs).last_hidden_state - expected).abs().max() <= 1e-5
    assert torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True).keys() == ours.keys()


def test_import_onto_a_head_model_and_export_with_its_prefix(tmp_path):
    """A bare-model AdapterHub adapter loads onto BertForSequenceClassification (keys gain the bert. prefix)."""
    import transformers

    inputs, expected = reference("bert-double_seq_bn")
    head = transformers.BertForSequenceClassification.from_pretrained(os.path.join(HERE, "base-bert")).eval()
    model = peftkit.PeftModel.from_pretrained(head, os.path.join(HERE, "bert-double_seq_bn"))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True).hidden_states[-1]
    assert (out - expected).abs().max() <= 1e-5
    model.save_pretrained(tmp_path, format="adapterhub")
    keys = load_file(tmp_path / "adapter.safetensors").keys()
    assert all(k.startswith("bert.encoder.layer.") for k in keys)
    back = peftkit.PeftModel.from_pretrained(base_model("bert"), tmp_path)  # the prefix is stripped again
    with torch.no_grad():
        assert (back(**inputs).last_hidden_state - expected).abs().max() <= 1e-5


def test_missing_shared_rule_is_reported(tmp_path):
    """AdapterHub drops Compacter's shared rule when saving from a bare model; we say so instead of guessing."""
    import shutil

    shutil.copytree(os.path.join(HERE, "bert-compacter"), tmp_path / "c")
    sd = torch.load(tmp_path / "c" / "pytorch_adapter.bin", weights_only=True)
    torch.save({k: v for k, v in sd.items() if "shared_parameters" not in k}, tmp_path / "c" / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match="shared rule"):
        peftkit.PeftModel.from_pretrained(base_model("bert"), tmp_path / "c")
