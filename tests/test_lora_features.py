"""LoRA's features beyond the shared contract: initialisations (PiSSA included), scaling, per-module patterns,
which modules get adapted, bias training, weighted combinations of adapters, and mixed-adapter batches.
Where PEFT defines the behaviour, the test compares with the ``peft`` package directly."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models import MODELS

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.engine.layer import AdapterLayer

peft = pytest.importorskip("peft")


from contract import _out, noise_adapter as _noise  # noqa: E402


def _lora_layers(model, lib):
    """module path (without base_model.model.) -> LoRA layer, for our model or peft's."""
    cls = AdapterLayer if lib is peftkit else peft.tuners.lora.LoraLayer
    return {n[len("base_model.model."):]: m for n, m in model.named_modules() if isinstance(m, cls)}


# ------------------------------------------------------------------------------------------- initialisation
def test_default_init_is_kaiming_uniform_a_and_zero_b():
    spec = MODELS["llama"]
    base = spec.build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules="all-linear"))
    samples = []
    for layer in _lora_layers(model, peftkit).values():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.count_nonzero(b) == 0
        bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        assert a.abs().max() <= bound
        samples.append(a.flatten() / bound)
    u = torch.cat(samples)  # pooled, should be U(-1, 1): std 1/sqrt(3)
    assert abs(u.std().item() - 1 / math.sqrt(3)) < 0.02 and abs(u.mean().item()) < 0.02
    torch.testing.assert_close(_out(spec, model), _out(spec, base), atol=1e-6, rtol=0)


def test_gaussian_init_and_false_init():
    spec = MODELS["llama"]
    base = spec.build()
    r = 8
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, target_modules="all-linear", init_lora_weights="gaussian"))
    a = torch.cat([l.lora_A["default"].weight.flatten() for l in _lora_layers(model, peftkit).values()])
    assert abs(a.std().item() - 1 / r) < 0.01 and abs(a.mean().item()) < 0.01  # peft: normal(0, 1/r)
    assert all(torch.count_nonzero(l.lora_B["default"].weight) == 0 for l in _lora_layers(model, peftkit).values())
    torch.testing.assert_close(_out(spec, model), _out(spec, base), atol=1e-6, rtol=0)

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, target_modules=["q_proj", "embed_tokens"],
                                                           init_lora_weights=False))
    for layer in _lora_layers(model, peftkit).values():
        assert all(torch.count_nonzero(p) == p.numel() for _, p in layer.adapter_parameters("default"))
    assert (_out(spec, model) - _out(spec, base)).abs().max() > 1e-3, "init_lora_weights=False is not an identity"


def test_rslora_scaling_matches_peft():
    base = MODELS["llama"].build()
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], use_rslora=True,
              rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 5})
    ours = _lora_layers(get_peft_model(copy.deepcopy(base), LoraConfig(**kw)), peftkit)
    theirs = _lora_layers(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)), peft)
    assert set(ours) == set(theirs)
    for name, layer in ours.items():
        expected = {"q_proj": 16 / math.sqrt(8), "v_proj": 5 / math.sqrt(8), "o_proj": 16 / math.sqrt(2)}
        assert layer.scaling["default"] == pytest.approx(expected[name.rsplit(".", 1)[1]], rel=1e-12)
        assert layer.scaling["default"] == pytest.approx(theirs[name].scaling["default"], rel=1e-12)


def _pissa_models(init, base, **extra):
    torch.manual_seed(11)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=init, **extra))
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=init, **extra))
    return ours, theirs


@pytest.mark.parametrize("name,extra", [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gpt2", dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
])
def test_pissa_residual_plus_adapter_is_the_original_weight_and_equals_peft(name, extra):
    spec = MODELS[name]
    base = spec.build()
    ours, theirs = _pissa_models("pissa", base, **extra)
    original = dict(base.named_modules())
    ours_layers, theirs_layers = _lora_layers(ours, peftkit), _lora_layers(theirs, peft)
    assert set(ours_layers) == set(theirs_layers) and ours_layers
    for path, layer in ours_layers.items():
        w = original[path].weight
        residual = layer.get_base_layer().weight
        assert not torch.allclose(residual, w, atol=1e-3), "PiSSA must move the principal part out of the base"
        torch.testing.assert_close(residual + layer.delta_weight("default"), w, atol=1e-5, rtol=0)
        # the adapter holds the top-r singular part of W
        oriented = w.t() if extra.get("fan_in_fan_out") else w
        u, s, vh = torch.linalg.svd(oriented, full_matrices=False)
        r = extra["r"]
        principal = (u[:, :r] * s[:r]) @ vh[:r]
        delta = layer.delta_weight("default")
        torch.testing.assert_close(delta.t() if extra.get("fan_in_fan_out") else delta, principal, atol=1e-5, rtol=0)
        ref = theirs_layers[path]
        torch.testing.assert_close(layer.lora_A["default"].weight, ref.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, ref.lora_B["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(residual, ref.get_base_layer().weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(_out(spec, ours), _out(spec, base), atol=1e-5, rtol=0)


def test_pissa_niter_is_a_close_principal_approximation():
    spec = MODELS["llama"]
    base = spec.build()
    ours, theirs = _pissa_models("pissa_niter_4", base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    original = dict(base.named_modules())
    for path, layer in _lora_layers(ours, peftkit).items():
        w = original[path].weight
        torch.testing.assert_close(layer.get_base_layer().weight + layer.delta_weight("default"), w, atol=1e-5, rtol=0)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        exact = (u[:, :4] * s[:4]) @ vh[:4]
        delta = layer.delta_weight("default")
        ref_delta = _lora_layers(theirs, peft)[path].get_delta_weight("default")
        # randomised SVD: captures nearly all of the top-r energy (random-init weights have a flat spectrum, so the
        # subspace itself is loosely determined), and is no further from the exact truncation than peft's
        assert 0.95 * exact.norm() <= delta.norm() <= 1.001 * exact.norm()
        assert (delta - exact).norm() <= 2 * (ref_delta - exact).norm() + 1e-3
    torch.testing.assert_close(_out(spec, ours), _out(spec, base), atol=1e-5, rtol=0)


def test_pissa_checkpoint_reloads_onto_the_original_base_both_ways(tmp_path):
    """A PiSSA adapter's config says init_lora_weights='pissa'; loading it onto the original base model recomputes the
    residual (PEFT does this), so trained outputs are reproduced by both libraries."""
    spec = MODELS["llama"]
    base = spec.build()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    _noise(ours, "default", 3, scale=0.05)  # "training"
    expected = _out(spec, ours)
    ours.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_out(spec, back), expected, atol=1e-5, rtol=0)
    theirs_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(_out(spec, theirs_loaded), expected, atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    _noise(theirs, "default", 4, scale=0.05)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours_loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(_out(spec, ours_loaded), _out(spec, theirs), atol=1e-5, rtol=0)


def test_pissa_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig(init_lora_weights="pissa", use_dora=True)
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(MODELS["llama"].build(), LoraConfig(init_lora_weights="pissa", target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="convolution"):
        get_peft_model(MODELS["cnn"].build(), LoraConfig(init_lora_weights="pissa_niter_2", target_modules=["conv0"]))


# ----------------------------------------------------------------------------------- which modules, which rank
PATTERN_CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                   rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 3, r"layers\.0\..*proj": 5},
                   alpha_pattern={"o_proj": 32, r"model\.layers\.1\.mlp\.down_proj": 3})),
    ("llama", dict(target_modules="all-linear", rank_pattern={"^model.layers.0.self_attn.q_proj": 6, "proj": 2})),
    ("llama", dict(target_modules=r".*layers\.1\..*(q|k)_proj")),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=r".*layers\.1.*")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1, layers_pattern="layers")),
    ("t5", dict(target_modules=["q", "v"], layers_to_transform=[1], layers_pattern="block")),
    ("t5", dict(target_modules=["q", "v", "wo"], layers_to_transform=[0])),
    ("t5", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules="all-linear")),
    ("bert", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("vit", dict(target_modules="all-linear", exclude_modules=["classifier"])),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
]


@pytest.mark.parametrize("name,kw", PATTERN_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PATTERN_CASES)])
def test_targets_ranks_and_alphas_equal_peft(name, kw):
    base = MODELS[name].build()
    ours = _lora_layers(get_peft_model(copy.deepcopy(base), LoraConfig(r=4, **kw)), peftkit)
    theirs = _lora_layers(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **kw)), peft)
    assert sorted(ours) == sorted(theirs)
    assert {n: l.r["default"] for n, l in ours.items()} == {n: l.r["default"] for n, l in theirs.items()}
    assert {n: l.lora_alpha["default"] for n, l in ours.items()} == {n: l.lora_alpha["default"] for n, l in theirs.items()}


def test_all_linear_skips_the_output_head_and_is_stored_expanded(tmp_path):
    base = MODELS["llama"].build()
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    targets = model.peft_config["default"].target_modules
    assert isinstance(targets, list) and "lm_head" not in targets
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert not isinstance(model.base_model.model.lm_head, AdapterLayer)


def test_bias_lora_only_trains_and_saves_only_adapted_biases(tmp_path):
    spec = MODELS["bert"]
    base = spec.build()
    kw = dict(r=4, target_modules=["query", "value"], bias="lora_only")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    bias_trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
    assert bias_trainable == sorted(
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.base_layer.bias" for i in range(2) for m in ("query", "value")
    )
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    model.train()
    kwargs = spec.inputs(4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = spec.loss(model, kwargs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained_bias = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.bias
    assert not torch.equal(trained_bias, base.bert.encoder.layer[0].attention.self.query.bias)
    model.eval()
    expected = _out(spec, model)
    model.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    reference.save_pretrained(str(tmp_path / "theirs"))
    assert keys == set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert torch.equal(_out(spec, PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")), expected)
    torch.testing.assert_close(
        _out(spec, peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))), expected, atol=1e-5, rtol=0
    )


# -------------------------------------------------------------------------------------- add_weighted_adapter
def _mlp_two_adapters(**kw_b):
    spec = MODELS["mlp"]
    base = spec.build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    model.add_adapter("b", LoraConfig(**{"r": 2, "lora_alpha": 3, "target_modules": ["lin1", "head"], **kw_b}))
    _noise(model, "default", 1)
    _noise(model, "b", 2)
    return spec, base, model


def _weighted_delta(layer, weights):
    return sum(w * layer.delta_weight(n) for n, w in weights.items() if n in layer.adapter_configs)


def test_weighted_cat_is_exact_and_svd_at_full_rank_too():
    spec, base, model = _mlp_two_adapters()
    weights = {"default": 0.7, "b": -1.3}
    model.add_weighted_adapter(list(weights), list(weights.values()), "cat", combination_type="cat")
    model.add_weighted_adapter(list(weights), list(weights.values()), "svd", combination_type="svd", svd_rank=6)
    model.add_weighted_adapter(list(weights), list(weights.values()), "svd_low", combination_type="svd")
    assert model.peft_config["cat"].r == 6 and model.peft_config["svd_low"].r == 4
    assert model.active_adapter == "default", "a combined adapter is not activated by creating it"
    for path, layer in model.base_model.adapter_layers():
        expected = _weighted_delta(layer, weights)
        torch.testing.assert_close(layer.delta_weight("cat"), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.delta_weight("svd"), expected, atol=1e-5, rtol=0)
        assert torch.linalg.matrix_rank(layer.delta_weight("svd_low")) <= 4
    # and the outputs follow: the combined adapter acts like both adapters with weights on a linear layer
    model.set_adapter("cat")
    layer = model.base_model.model.lin1
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base.lin1(x) + x @ _weighted_delta(layer, weights).t(), atol=1e-5, rtol=0)


def test_weighted_adapters_equal_peft(tmp_path):
    """Same adapters, same weights: our combined adapters equal PEFT's (linear, cat, svd)."""
    spec = MODELS["llama"]
    base = spec.build()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    ours.add_adapter("b", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "o_proj", "embed_tokens"]))
    _noise(ours, "default", 1)
    _noise(ours, "b", 2)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "b"), "b")
    for combo in ("linear", "cat", "svd"):
        args = (["default", "b"], [0.6, -0.9], f"mix_{combo}")
        ours.add_weighted_adapter(*args, combination_type=combo)
        theirs.add_weighted_adapter(*args, combination_type=combo)
        ours_layers, theirs_layers = _lora_layers(ours, peftkit), _lora_layers(theirs, peft)
        for path, layer in ours_layers.items():
            if f"mix_{combo}" not in layer.adapter_configs:
                continue
            ref = theirs_layers[path].get_delta_weight(f"mix_{combo}")
            torch.testing.assert_close(layer.delta_weight(f"mix_{combo}"), ref, atol=1e-5, rtol=0, msg=f"{combo} {path}")
        ours.set_adapter(f"mix_{combo}")
        theirs.set_adapter(f"mix_{combo}")
        torch.testing.assert_close(_out(spec, ours), _out(spec, theirs), atol=1e-5, rtol=0)


def test_weighted_linear_follows_its_definition():
    """linear: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i, new scaling 1 (alpha = r)."""
    spec, base, model = _mlp_two_adapters(r=4, lora_alpha=16, target_modules=["lin1", "lin0"])
    weights = [0.5, -2.0]
    model.add_weighted_adapter(["default", "b"], weights, "lin", combination_type="linear")
    for _, layer in model.base_model.adapter_layers():
        a = sum(math.copysign(math.sqrt(abs(w * layer.scaling[n])), w * layer.scaling[n]) * layer.lora_A[n].weight
                for n, w in zip(["default", "b"], weights))
        b = sum(math.sqrt(abs(w * layer.scaling[n])) * layer.lora_B[n].weight for n, w in zip(["default", "b"], weights))
        assert layer.scaling["lin"] == 1.0
        torch.testing.assert_close(layer.lora_A["lin"].weight, a, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B["lin"].weight, b, atol=1e-6, rtol=0)


def test_weighted_adapter_errors_and_regex_targets():
    spec, base, model = _mlp_two_adapters()
    with pytest.raises(ValueError, match="same rank"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="linear")
    with pytest.raises(ValueError, match="No adapter named 'nope'"):
        model.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "x", combination_type="cat")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "b", combination_type="cat")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1.0], "x", combination_type="cat")
    with pytest.raises(ValueError, match="combination_type"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="median")
    assert list(model.peft_config) == ["default", "b"], "a refused combination must not leave an adapter behind"
    # adapters targeted by regex strings combine into a regex that matches both
    regex = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=r"lin0"))
    regex.add_adapter("b", LoraConfig(r=2, target_modules=r".*1"))
    regex.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert sorted(n for n, l in regex.base_model.adapter_layers() if "mix" in l.adapter_configs) == ["lin0", "lin1"]
    regex.add_adapter("c", LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="same form"):
        regex.add_weighted_adapter(["default", "c"], [1.0, 1.0], "mix2", combination_type="cat")
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["lin0"], use_dora=True))
    dora.add_adapter("b", LoraConfig(r=2, target_modules=["lin0"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        dora.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")


def test_weighted_cat_on_conv_and_embedding_is_exact():
    for name, targets in (("cnn", ["conv0", "conv1"]), ("llama", ["embed_tokens"])):
        base = MODELS[name].build()
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=targets))
        model.add_adapter("b", LoraConfig(r=3, lora_alpha=5, target_modules=targets))
        _noise(model, "default", 1)
        _noise(model, "b", 2)
        model.add_weighted_adapter(["default", "b"], [2.0, 0.5], "cat", combination_type="cat")
        model.add_weighted_adapter(["default", "b"], [2.0, 0.5], "svd", combination_type="svd", svd_rank=5)
        for _, layer in model.base_model.adapter_layers():
            expected = _weighted_delta(layer, {"default": 2.0, "b": 0.5})
            torch.testing.assert_close(layer.delta_weight("cat"), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(layer.delta_weight("svd"), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------- mixed-adapter batches
def _rowwise(spec, model, kwargs, names):
    """Each row alone, with its adapter (or none)."""
    rows = []
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in kwargs.items()}
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(spec.output(model(**row)))
            else:
                model.set_adapter(name)
                rows.append(spec.output(model(**row)))
    return torch.cat(rows)


@pytest.mark.parametrize("name,cfg_a,cfg_b", [
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), dict(r=2, lora_alpha=5, target_modules=["q_proj", "o_proj"])),
    ("bert", dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
     dict(r=2, target_modules=["query"], modules_to_save=["classifier"])),
    ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True), dict(r=2, use_dora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    ("cnn", dict(r=2, target_modules=["conv0", "lin"]), dict(r=3, target_modules=["conv1"])),
])
def test_mixed_batch_equals_each_row_alone(name, cfg_a, cfg_b):
    spec = MODELS[name]
    model = get_peft_model(spec.build(), LoraConfig(**cfg_a))
    model.add_adapter("b", LoraConfig(**cfg_b))
    _noise(model, "default", 1)
    _noise(model, "b", 2)
    model.eval()
    names = ["default", "b", "__base__", "b", "default"]
    kwargs = spec.inputs(len(names))
    with torch.no_grad():
        mixed = spec.output(model(**kwargs, adapter_names=names))
    expected = _rowwise(spec, model, kwargs, names)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
    assert (expected[0] - expected[1]).abs().max() > 1e-4  # the adapters really differ


def _generate_rows(model, ids, names, **gen):
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model.generate(input_ids=ids[i:i + 1], **gen))
        else:
            model.set_adapter(name)
            rows.append(model.generate(input_ids=ids[i:i + 1], **gen))
    return torch.cat(rows)


@pytest.mark.parametrize("name,targets,task", [("llama", ["q_proj", "v_proj"], "CAUSAL_LM"), ("t5", ["q", "v", "o"], "SEQ_2_SEQ_LM")])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_generate(name, targets, task, num_beams):
    spec = MODELS[name]
    model = get_peft_model(spec.build(), LoraConfig(r=4, target_modules=targets, task_type=task))
    model.add_adapter("b", LoraConfig(r=4, target_modules=targets, task_type=task))
    _noise(model, "default", 1, scale=1.0)
    _noise(model, "b", 2, scale=1.0)
    model.eval()
    names = ["b", "__base__", "default"]
    ids = spec.inputs(3)["input_ids"][:, :5]
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=num_beams)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **gen)
        expected = _generate_rows(model, ids, names, **gen)
    assert torch.equal(mixed, expected)
    assert len({tuple(r.tolist()[-4:]) for r in expected}) > 1
