"""LayerNorm tuning: the shared contract (with checkpoint parity against Hugging Face PEFT both ways) on Llama
(LlamaRMSNorm), T5 (T5LayerNorm), GPT-2 and BERT (nn.LayerNorm), ViT, plus torch's RMSNorm/GroupNorm, several named
adapters, one-active-at-a-time, mixed-adapter batches, exact unmerge and PEFT's parameter counts."""

import copy

import pytest
import torch
import torch.nn as nn
from contract import Case, _close, _out, contract_tests
from models import MODELS, ModelSpec

import peftkit
from peftkit import LNTuningConfig
from peftkit.engine.layer import AdapterLayer
from peftkit.methods.adapters.ln_tuning import LNTuningLayer


class _NormNet(nn.Module):
    """torch's own RMSNorm and GroupNorm, which the transformers zoo does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.rms = nn.RMSNorm(32)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(40, 4)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.rms(torch.relu(self.lin0(x)))
        c = self.bn(self.gn(self.conv(img))).mean(dim=(2, 3))
        return self.head(torch.cat([h, c], dim=-1))


def _norm_net() -> nn.Module:
    torch.manual_seed(0)
    return _NormNet().eval()


def _norm_inputs(b):
    g = torch.Generator().manual_seed(7)
    return {"x": torch.randn(b, 16, generator=g), "img": torch.randn(b, 3, 6, 6, generator=g)}


MODELS.setdefault("norm-net", ModelSpec(
    "norm-net", _norm_net, _norm_inputs, lambda o: o,
    lambda m, kw: nn.functional.cross_entropy(m(**kw), torch.arange(kw["x"].shape[0]) % 4)))


def _perturb(model):
    """Noise on the tuned copies (a random tiny BERT/ViT's logits are ~0.01, so they need a visible change)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("ln_tuning_" in n or ".modules_to_save." in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def ln_case(id, model, ref=True, **kwargs):
    return Case(id, model, lambda: LNTuningConfig(**kwargs),
                ref=(lambda peft: peft.LNTuningConfig(**kwargs)) if ref else None, perturb=_perturb)


CASES = [
    ln_case("ln-llama-rmsnorm-defaults", "llama"),
    ln_case("ln-t5-defaults", "t5"),
    ln_case("ln-gpt2-defaults", "gpt2"),
    ln_case("ln-bert-cls", "bert", target_modules=["LayerNorm"], modules_to_save=["classifier"]),
    ln_case("ln-vit", "vit", target_modules=["layernorm_before", "layernorm_after"], modules_to_save=["classifier"]),
    ln_case("ln-torch-rms-group", "norm-net", target_modules=["rms", "gn"]),
    # as in PEFT, a module targeted by name is tuned whatever its type (a Linear; a BatchNorm with its statistics)
    ln_case("ln-any-targeted-module", "norm-net", target_modules=["lin0", "bn"]),
    ln_case("ln-llama-regex", "llama", target_modules=r".*layers\.1\..*layernorm"),
]

globals().update(contract_tests(CASES))


@pytest.mark.parametrize("model,kwargs", [("llama", {}), ("t5", {}), ("gpt2", {}),
                                          ("bert", {"target_modules": ["LayerNorm"]})])
def test_trainable_counts_and_keys_equal_peft(model, kwargs):
    peft = pytest.importorskip("peft")
    base = MODELS[model].build()
    ours = peftkit.get_peft_model(copy.deepcopy(base), LNTuningConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours_sd = peftkit.get_adapter_state_dict(ours.base_model, "default")
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in theirs_sd.items()}
    assert all(".ln_tuning_layers." in k for k in ours_sd)


def test_named_adapters_switch_and_mix():
    spec = MODELS["llama"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), LNTuningConfig()).eval()
    model.add_adapter("b", LNTuningConfig(target_modules=["input_layernorm"]))
    _perturb(model)  # only the active adapter's copies train; perturb both explicitly
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ln_tuning_layers.b." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    out_a = _out(spec, model, batch=4)
    model.set_adapter("b")
    out_b = _out(spec, model, batch=4)
    assert (out_a - out_b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="only one can be active"):
        model.set_adapter(["default", "b"])
    assert model.active_adapters == ["b"]
    names = ["b", "default", "__base__", "default"]
    mixed = _out(spec, model, batch=4, adapter_names=names)
    base_out = _out(spec, base, batch=4)
    _close(mixed[0], out_b[0], 1e-5, "row 0 (b)")
    _close(mixed[1], out_a[1], 1e-5, "row 1 (default)")
    _close(mixed[3], out_a[3], 1e-5, "row 3 (default)")
    _close(mixed[2], base_out[2], 1e-6, "row 2 (base)")
    model.delete_adapter("b")
    assert model.active_adapters == ["default"]
    _close(_out(spec, model, batch=4), out_a, 1e-6, "after deleting b")


def test_merge_is_exact_and_unmerge_restores_bits():
    spec = MODELS["t5"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), LNTuningConfig()).eval()
    _perturb(model)
    unmerged = _out(spec, model)
    originals = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    model.merge_adapter()
    assert torch.equal(_out(spec, model), unmerged)
    model.add_adapter("late", LNTuningConfig())  # copies the original values, not the merged ones
    model.unmerge_adapter()
    for n, p in model.get_base_model().named_parameters():
        if n in originals:
            assert torch.equal(p, originals[n]), n
    layer = next(m for m in model.modules() if isinstance(m, LNTuningLayer))
    assert torch.equal(layer.ln_tuning_layers["late"].weight, layer.base_layer.weight)


def test_only_modules_with_parameters_are_adapted():
    base = MODELS["llama"].build()
    with pytest.raises(ValueError, match="cannot adapt any"):
        peftkit.get_peft_model(base, LNTuningConfig(target_modules=["act_fn"]))  # SiLU: nothing to tune
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    with pytest.raises(ValueError, match="no default for model type"):
        peftkit.get_peft_model(MODELS["mlp"].build(), LNTuningConfig())


def test_a_targeted_batch_norm_keeps_its_running_statistics_through_save_load_and_merge(tmp_path):
    model = peftkit.get_peft_model(_norm_net(), LNTuningConfig(target_modules=["bn"]))
    inputs = _norm_inputs(8)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(**inputs)  # updates the copy's running statistics, not the frozen original's
    model.eval()
    tuned = model.base_model.model.bn.ln_tuning_layers["default"]
    original = model.base_model.model.bn.base_layer
    assert not torch.equal(tuned.running_mean, original.running_mean) and int(tuned.num_batches_tracked) == 3
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.bn.ln_tuning_layers.running_mean", "base_model.model.bn.ln_tuning_layers.running_var",
            "base_model.model.bn.ln_tuning_layers.num_batches_tracked"} <= keys
    loaded = peftkit.PeftModel.from_pretrained(_norm_net(), tmp_path).eval()
    torch.testing.assert_close(loaded(**inputs), expected, rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(**inputs), expected, rtol=0, atol=0)


def test_checkpoint_config_reads_in_peft_without_unknown_keys(tmp_path):
    import json

    model = peftkit.get_peft_model(MODELS["gpt2"].build(), LNTuningConfig())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LN_TUNING" and "layers_to_transform" not in cfg
    assert sorted(cfg["target_modules"]) == ["ln_1", "ln_2", "ln_f"]


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert", "t5"])
def test_outputs_identical_to_peft_both_ways(model_name, tmp_path):
    from test_ia3 import identical_both_ways

    peft = pytest.importorskip("peft")
    kw = {"target_modules": ["LayerNorm"]} if model_name == "bert" else {}
    identical_both_ways(model_name, LNTuningConfig(**kw), peft.LNTuningConfig(**kw), "ln_tuning_layers", tmp_path)
