"""(IA)^3: the shared contract (with checkpoint parity against Hugging Face PEFT both ways) on Llama, GPT-2's Conv1D,
BERT, T5, Conv2d and an MLP, plus the method's own checks: PEFT's defaults, shapes and parameter counts, input vs
output scaling, merge/unmerge of several adapters, mixed-adapter batches."""

import copy

import pytest
import torch
from contract import Case, _close, _out, contract_tests
from models import MODELS, ModelSpec

import peftkit
from peftkit import IA3Config
from peftkit.engine.layer import AdapterLayer
from peftkit.methods.adapters.ia3 import IA3Layer


class _ConvNet(torch.nn.Module):
    """A grouped Conv2d (input scaling must expand over the groups when merged) and a Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = torch.nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.vol = torch.nn.Conv3d(2, 6, 3, padding=1)
        self.head = torch.nn.Linear(18, 4)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = self.grouped(torch.relu(self.conv0(x))).mean(dim=(2, 3))
        return self.head(torch.cat([h, torch.relu(self.vol(v)).mean(dim=(2, 3, 4))], dim=-1))


def _conv_net():
    torch.manual_seed(0)
    return _ConvNet().eval()


def _conv_inputs(b):
    g = torch.Generator().manual_seed(8)
    return {"x": torch.randn(b, 4, 6, 6, generator=g), "v": torch.randn(b, 2, 4, 4, 4, generator=g)}


MODELS.setdefault("conv-net", ModelSpec(
    "conv-net", _conv_net, _conv_inputs, lambda o: o,
    lambda m, kw: torch.nn.functional.cross_entropy(m(**kw), torch.arange(kw["x"].shape[0]) % 4)))


def ia3_case(id, model, identity=True, perturb=None, train_lr=1e-2, **kwargs):
    return Case(id, model, lambda: IA3Config(**kwargs), ref=lambda peft: peft.IA3Config(**kwargs),
                identity_init=identity, perturb=perturb, train_lr=train_lr)


def _perturb_with_head(model):
    """Vectors and the trained classifier copy: a random tiny BERT's logits are ~0.01, so small vector noise alone
    moves them by less than the contract's 1e-4 threshold."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("ia3_" in n or ".modules_to_save." in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


CASES = [
    ia3_case("ia3-llama-defaults", "llama"),
    # GPT-2 trains with dropout: 8 steps at 1e-2 move 96 x 3 scales less than the dropout noise
    ia3_case("ia3-gpt2-conv1d-defaults", "gpt2", train_lr=0.1),
    ia3_case("ia3-bert-cls", "bert", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
             modules_to_save=["classifier"], perturb=_perturb_with_head),
    ia3_case("ia3-t5-defaults", "t5"),
    ia3_case("ia3-conv2d", "cnn", target_modules=["conv0", "conv1", "lin"], feedforward_modules=["conv1", "lin"]),
    ia3_case("ia3-grouped-conv2d-conv3d", "conv-net", target_modules=["conv0", "grouped", "vol"],
             feedforward_modules=["grouped", "vol"]),
    ia3_case("ia3-llama-regex-ff", "llama", target_modules=r".*\.(q_proj|up_proj|down_proj)",
             feedforward_modules=r".*\.down_proj"),
    ia3_case("ia3-mlp-random-init", "mlp", identity=False, target_modules=["lin0", "lin1"], feedforward_modules=["lin1"],
             init_ia3_weights=False),
    ia3_case("ia3-llama-exclude", "llama", target_modules=["k_proj", "v_proj", "down_proj"],
             feedforward_modules=["down_proj"], exclude_modules=["model.layers.0.self_attn.k_proj"]),
]

globals().update(contract_tests(CASES))


def _noise(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("model", ["llama", "gpt2", "bert", "t5"])
def test_defaults_shapes_and_counts_equal_peft(model):
    peft = pytest.importorskip("peft")
    base = MODELS[model].build()
    ours = peftkit.get_peft_model(copy.deepcopy(base), IA3Config())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config())
    ours_shapes = {k: tuple(v.shape) for k, v in peftkit.get_adapter_state_dict(ours.base_model, "default").items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert ours_shapes == theirs_shapes
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    cfg = ours.peft_config["default"]
    assert set(cfg.target_modules) == set(theirs.peft_config["default"].target_modules)
    assert set(cfg.feedforward_modules) == set(theirs.peft_config["default"].feedforward_modules)


def test_feedforward_scales_input_others_scale_output():
    base = MODELS["mlp"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["lin0", "lin1"],
                                                                 feedforward_modules=["lin1"]))
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert tuple(lin0.ia3_l["default"].shape) == (32, 1) and tuple(lin1.ia3_l["default"].shape) == (1, 32)
    _noise(model)
    x = torch.randn(5, 16)
    b0, b1 = base.lin0, base.lin1
    with torch.no_grad():
        assert torch.allclose(lin0(x), b0(x) * lin0.ia3_l["default"].reshape(-1), atol=1e-6)
        h = torch.randn(5, 32)
        assert torch.allclose(lin1(h), b1(h * lin1.ia3_l["default"].reshape(-1)), atol=1e-6)


def test_several_active_adapters_multiply_and_merge():
    spec = MODELS["llama"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), IA3Config())
    model.add_adapter("b", IA3Config(target_modules=["k_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj"]))
    _noise(model, seed=1)
    model.set_adapter(["default", "b"])
    both = _out(spec, model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 48)
    with torch.no_grad():
        scale = layer.ia3_l["default"].reshape(-1) * layer.ia3_l["b"].reshape(-1)
        assert torch.allclose(layer(x), layer.base_layer(x * scale), atol=1e-6)
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "ia3_l" not in n}
    model.merge_adapter()
    _close(_out(spec, model), both, 1e-5, "merged two adapters")
    model.unmerge_adapter()
    for n, p in model.get_base_model().named_parameters():
        if n in before:
            _close(p.detach(), before[n], 1e-6, n)
    _close(_out(spec, model), both, 1e-6, "after unmerge")


def test_unmerge_restores_exactly_with_zero_entries():
    base = MODELS["mlp"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=[]))
    with torch.no_grad():
        model.base_model.model.lin0.ia3_l["default"][3] = 0.0
    w, b = base.lin0.weight.clone(), base.lin0.bias.clone()
    model.merge_adapter()
    inner = model.base_model.model.lin0.get_base_layer()
    assert inner.weight[3].abs().sum() == 0 and inner.bias[3] == 0
    model.unmerge_adapter()
    assert torch.equal(inner.weight, w) and torch.equal(inner.bias, b)


def test_merge_scales_conv1d_bias_and_weight_like_peft():
    peft = pytest.importorskip("peft")
    spec = MODELS["gpt2"]
    base = spec.build()
    ours = peftkit.get_peft_model(copy.deepcopy(base), IA3Config())
    _noise(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config())
    peft.set_peft_model_state_dict(theirs, {k: v.clone() for k, v in
                                            peftkit.get_adapter_state_dict(ours.base_model, "default").items()})
    a = copy.deepcopy(ours).merge_and_unload().state_dict()
    b = theirs.merge_and_unload().state_dict()
    for k in a:
        _close(a[k], b[k], 1e-6, k)
    assert ours.peft_config["default"].fan_in_fan_out is True


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "cnn"])
def test_mixed_adapter_batch(model_name):
    spec = MODELS[model_name]
    base = spec.build()
    if model_name == "cnn":
        cfg = lambda: IA3Config(target_modules=["conv0", "conv1", "lin"], feedforward_modules=["conv1"])
    else:
        cfg = lambda: IA3Config()
    model = peftkit.get_peft_model(copy.deepcopy(base), cfg()).eval()
    model.add_adapter("b", cfg())
    _noise(model, seed=2)
    names = ["default", "b", "__base__", "b"]
    mixed = _out(spec, model, batch=4, adapter_names=names)
    base_out = _out(spec, base, batch=4)
    for name in ("default", "b"):
        model.set_adapter(name)
        single = _out(spec, model, batch=4)
        for i, n in enumerate(names):
            if n == name:
                _close(mixed[i], single[i], 1e-5, f"row {i} ({n})")
    _close(mixed[2], base_out[2], 1e-6, "row without adapter")
    assert (mixed[0] - mixed[1]).abs().max() > 1e-4


def test_checkpoint_keys_are_peft_names(tmp_path):
    model = peftkit.get_peft_model(MODELS["llama"].build(), IA3Config())
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    assert all(k.endswith(".ia3_l") for k in keys) and len(keys) == 6
    import json

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and "layers_to_transform" not in cfg


def test_errors_are_clear():
    with pytest.raises(ValueError, match="subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="feedforward_modules"):
        peftkit.get_peft_model(MODELS["mlp"].build(), IA3Config(target_modules=["lin0"]))
    base = MODELS["mlp"].build()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(ValueError, match="matched no module"):
        peftkit.get_peft_model(base, IA3Config(target_modules=["nope"], feedforward_modules=[]))
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_layers_to_transform():
    model = peftkit.get_peft_model(MODELS["llama"].build(), IA3Config(layers_to_transform=[1], layers_pattern="layers"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, IA3Layer)]
    assert wrapped and all(".layers.1." in n for n in wrapped)


def test_cli_defaults_are_the_methods_own():
    """peftkit train/bench: (IA)^3, LN tuning and BitFit keep their own targets (the survey ran each with its
    library's defaults) instead of the attention projections other methods get."""
    from peftkit.cli.method_defaults import build_method_config

    from peftkit.engine.registry import get_method

    bert = MODELS["bert"].build()
    for method in ("IA3", "LN_TUNING", "BITFIT"):
        cfg = build_method_config(method, bert, [], total_steps=10)
        assert isinstance(cfg, get_method(method).config_cls) and cfg.target_modules is None, method
        model = peftkit.get_peft_model(copy.deepcopy(bert), cfg)
        targets = model.peft_config["default"].target_modules
        if method == "IA3":
            assert set(targets) == {"key", "value", "output.dense"}
            assert model.peft_config["default"].feedforward_modules == ["output.dense"]
        elif method == "LN_TUNING":
            assert targets == ["LayerNorm"]
        else:
            assert len(targets) == sum(1 for n, _ in bert.named_parameters() if n.endswith("bias")) - 1  # head
    cfg = build_method_config("IA3", bert, ["target_modules=query,value", "feedforward_modules=[]"])
    assert cfg.target_modules == ["query", "value"] and cfg.feedforward_modules == []


def test_safe_merge_refuses_nonfinite_and_changes_nothing():
    base = MODELS["mlp"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["lin0", "lin1"],
                                                                 feedforward_modules=["lin1"]))
    with torch.no_grad():
        model.base_model.model.lin1.ia3_l["default"][0, 2] = float("inf")
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.merged for m in model.modules() if isinstance(m, IA3Layer))


def identical_both_ways(model_name, ours_cfg, ref_cfg, prefix, tmp_path):
    """A checkpoint moved peft -> peftkit and peftkit -> peft gives bit-identical outputs (same operations)."""
    peft = pytest.importorskip("peft")
    spec = MODELS[model_name]
    base = spec.build()

    def noise(m, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if prefix in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)

    ref = peft.get_peft_model(copy.deepcopy(base), ref_cfg).eval()
    noise(ref, 0)
    ref.save_pretrained(str(tmp_path / "theirs"))
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    assert torch.equal(_out(spec, ours), _out(spec, ref)), "peft -> peftkit"
    mine = peftkit.get_peft_model(copy.deepcopy(base), ours_cfg).eval()
    noise(mine, 1)
    mine.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert torch.equal(_out(spec, back), _out(spec, mine)), "peftkit -> peft"


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert", "t5"])
def test_outputs_identical_to_peft_both_ways(model_name, tmp_path):
    peft = pytest.importorskip("peft")
    identical_both_ways(model_name, IA3Config(), peft.IA3Config(), "ia3_l", tmp_path)


def test_add_weighted_adapter_matches_peft():
    peft = pytest.importorskip("peft")
    spec = MODELS["llama"]
    base = spec.build()
    cfg_a = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    cfg_b = dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours = peftkit.get_peft_model(copy.deepcopy(base), IA3Config(**cfg_a)).eval()
    ours.add_adapter("b", IA3Config(**cfg_b))
    _noise(ours, seed=4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**cfg_a)).eval()
    theirs.add_adapter("b", peft.IA3Config(**cfg_b))
    sd = {**peftkit.get_adapter_state_dict(ours.base_model, "default")}
    peft.set_peft_model_state_dict(theirs, sd, adapter_name="default")
    peft.set_peft_model_state_dict(theirs, peftkit.get_adapter_state_dict(ours.base_model, "b"), adapter_name="b")
    ours.add_weighted_adapter(["default", "b"], [0.7, 0.5], "mix")
    theirs.add_weighted_adapter(["default", "b"], [0.7, 0.5], "mix")
    assert ours.active_adapters == ["default"]
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    assert torch.equal(_out(spec, ours), _out(spec, theirs))
    assert set(ours.peft_config["mix"].target_modules) == {"k_proj", "q_proj", "v_proj", "down_proj"}
    with pytest.raises(ValueError, match="one weight per adapter"):
        ours.add_weighted_adapter(["default", "b"], [1.0], "bad")
    assert "bad" not in ours.peft_config
