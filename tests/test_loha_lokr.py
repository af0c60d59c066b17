"""LoHa, LoKr and KronA: the shared contract on every supported layer type, plus method-specific checks
(factor shapes, PEFT's parameter counts for ViT-base, fast paths = reference math, dropout semantics)."""

import copy

import pytest
import torch
import torch.nn as nn
from contract import Case, contract_tests
from models import MODELS, VIT_QV, ModelSpec

import peftkit
from peftkit import KronAConfig, LoHaConfig, LoKrConfig
from peftkit.methods.lycoris import lycoris_ops as ops
from peftkit.methods.lycoris.lokr import KRONA_RANK


# A tiny 1-d conv net: nn.Conv1d is a layer type both methods support in PEFT, absent from the shared zoo.
class _Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv1 = nn.Conv1d(8, 12, 3, padding=1)
        self.pw = nn.Conv1d(12, 12, 1)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pw(torch.relu(self.conv1(torch.relu(self.conv0(x))))))
        return self.head(h.mean(dim=2))


def _conv1d_net() -> nn.Module:
    torch.manual_seed(0)
    return _Conv1dNet().eval()


MODELS.setdefault("conv1d-net", ModelSpec(
    "conv1d-net", _conv1d_net, lambda b: {"x": torch.randn(b, 4, 10, generator=torch.Generator().manual_seed(6))},
    lambda o: o, lambda m, kw: nn.functional.cross_entropy(m(**kw), torch.arange(kw["x"].shape[0]) % 4)))


def loha_case(id, model, identity=True, **kwargs):
    return Case(id, model, lambda: LoHaConfig(**kwargs), ref=lambda peft: peft.LoHaConfig(**kwargs),
                identity_init=identity)


def lokr_case(id, model, identity=True, **kwargs):
    return Case(id, model, lambda: LoKrConfig(**kwargs), ref=lambda peft: peft.LoKrConfig(**kwargs),
                identity_init=identity)


QV = ["q_proj", "v_proj"]
CASES = [
    # LoHa on hidden 32: r=4 takes the merged-weight path, r=2 the rank-r^2 factored one (3 * 4 * 64 < 32 * 32).
    loha_case("loha-llama-all-linear", "llama", r=4, alpha=8, target_modules="all-linear"),
    loha_case("loha-llama-layers", "llama", r=2, target_modules=QV, layers_to_transform=[1], layers_pattern="layers"),
    loha_case("loha-vit-cls", "vit", r=4, alpha=4, target_modules=VIT_QV, modules_to_save=["classifier"]),
    loha_case("loha-mlp-patterns", "mlp", r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2},
              alpha_pattern={"lin0": 16}),
    loha_case("loha-random-init", "mlp", identity=False, r=4, init_weights=False, target_modules=["lin0", "lin1"]),
    loha_case("loha-conv2d", "cnn", r=2, target_modules=["conv0", "conv1", "lin"]),
    Case("loha-conv2d-effective", "cnn", lambda: LoHaConfig(r=2, use_effective_conv2d=True, target_modules=["conv0", "conv1"]),
         ref=lambda peft: peft.LoHaConfig(r=2, use_effective_conv2d=True, target_modules=["conv0", "conv1"]),
         train_lr=0.1),  # three small factors multiply: slower start than the flat form
    # pw has kernel 1: the flat form is used for it even with use_effective_conv2d (as in PEFT).
    loha_case("loha-conv1d-effective", "conv1d-net", r=2, use_effective_conv2d=True, target_modules=["conv0", "pw"]),
    # LoKr: hidden 32 = 4 x 8; r=2 makes w2 a rank-2 pair (2 < 8 / 2); decompose_both with r=1 also w1.
    lokr_case("lokr-llama-all-linear-lowrank", "llama", r=2, target_modules="all-linear"),
    lokr_case("lokr-mlp-decompose-both", "mlp", r=1, decompose_both=True, target_modules=["lin0", "lin1", "head"]),
    lokr_case("lokr-vit-cls", "vit", r=4, alpha=4, target_modules=VIT_QV, modules_to_save=["classifier"]),
    lokr_case("lokr-mlp-factor", "mlp", r=2, decompose_factor=2, rank_dropout_scale=True,
              target_modules=["lin0", "lin1", "head"], rank_pattern={"lin1": 8}),
    lokr_case("lokr-lycoris-init", "mlp", r=2, init_weights="lycoris", target_modules=["lin0", "lin1"]),
    # conv0/lin: full w2 (kernel in w2); conv1 at r=1: flattened rank-1 pair.
    lokr_case("lokr-conv2d", "cnn", r=4, target_modules=["conv0", "conv1", "lin"], rank_pattern={"conv1": 1}),
    lokr_case("lokr-conv2d-effective", "cnn", r=1, use_effective_conv2d=True, target_modules=["conv0", "conv1"]),
    lokr_case("lokr-conv1d-full", "conv1d-net", r=4, target_modules=["conv0", "conv1", "pw"]),
    # peft 0.21's LoKr crashes in forward on Conv1d with the Tucker form (torch.kron on its view), so no parity.
    Case("lokr-conv1d-effective", "conv1d-net",
         lambda: LoKrConfig(r=1, use_effective_conv2d=True, target_modules=["conv0", "conv1"])),
    # KronA = LoKr with both factors full; written as a LOKR checkpoint with alpha / r = scale.
    Case("krona-llama", "llama", lambda: KronAConfig(scale=2.0, target_modules=QV),
         ref=lambda peft: peft.LoKrConfig(r=KRONA_RANK, alpha=2.0 * KRONA_RANK, target_modules=QV)),
]

globals().update(contract_tests(CASES))


# ------------------------------------------------------------------------------------------ factor shapes
def test_factorization_matches_peft():
    peft_lokr = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert ops.factorization(dim, factor) == peft_lokr.factorization(dim, factor), (dim, factor)
    assert ops.factorization(768) == (24, 32)


def _vit_base(config):
    from transformers import ViTConfig, ViTForImageClassification

    with torch.device("meta"):  # shapes only: counting parameters needs no memory or init time
        model = ViTForImageClassification(ViTConfig(num_labels=101))
    return peftkit.get_peft_model(model, config)


def test_vit_base_parameter_counts_match_the_seed_guide():
    common = dict(r=16, alpha=16, target_modules=VIT_QV, module_dropout=0.1, modules_to_save=["classifier"])
    trainable, total = _vit_base(LoHaConfig(**common)).get_nb_trainable_parameters()
    assert (trainable, total) == (1_257_317, 87_133_642)
    trainable, _ = _vit_base(LoKrConfig(**common)).get_nb_trainable_parameters()
    assert trainable == 116_069  # 24 layers x (24x24 + 32x32) + the classifier copy (77,669)


# ------------------------------------------------------------------------------------------ fast paths
def _single_layer(config, in_f=48, out_f=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f))
    model = peftkit.get_peft_model(model, config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layer = model.base_model.model[0]
    return model.eval(), layer


def _outputs_and_grads(model, layer, x, fast):
    layer.fast_path = fast
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), x.grad, grads


def _saved_full_size(model, layer, x):
    """Tensors of the (out, in) weight's shape that autograd keeps for backward, other than the base weight."""
    weight = layer.get_base_layer().weight
    found = []

    def pack(t):
        if tuple(t.shape) == tuple(weight.shape) and t.data_ptr() != weight.data_ptr():
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.requires_grad_(True)).sum()
    return found


# in=48, out=40: factored iff 3 r^2 (48 + 40) < 48 * 40, i.e. r <= 2.
@pytest.mark.parametrize("r,rank_dropout,expected_path", [(2, 0.0, "factored"), (12, 0.0, "merged"),
                                                          (12, 0.3, "recompute")])
def test_loha_fast_paths_match_reference(r, rank_dropout, expected_path):
    model, layer = _single_layer(LoHaConfig(r=r, alpha=3, rank_dropout=rank_dropout, target_modules=["0"]))
    model.train()
    x = torch.randn(2, 5, 48)
    torch.manual_seed(1)  # same rank-dropout mask in both runs
    ref = _outputs_and_grads(model, layer, x, fast=False)
    torch.manual_seed(1)
    fast = _outputs_and_grads(model, layer, x, fast=True)
    assert layer.forward_paths == {"default": expected_path}
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(fast[2][n], ref[2][n], rtol=1e-4, atol=1e-4)
    # No (out, in) tensor is kept for backward by the fast path; the reference does keep one.
    assert _saved_full_size(model, layer, x) == []
    layer.fast_path = False
    assert _saved_full_size(model, layer, x) != []


def test_loha_merged_path_with_two_adapters_and_trainable_base():
    model, layer = _single_layer(LoHaConfig(r=12, target_modules=["0"]))
    model.add_adapter("second", LoHaConfig(r=10, alpha=5, target_modules=["0"]))
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "second" in n:
                p.copy_(torch.randn(p.shape) * 0.3)
    layer.get_base_layer().weight.requires_grad_(True)
    layer.get_base_layer().bias.requires_grad_(True)
    assert layer.forward_paths == {"default": "merged", "second": "merged"}
    x = torch.randn(7, 48)
    ref = _outputs_and_grads(model, layer, x, fast=False)
    fast = _outputs_and_grads(model, layer, x, fast=True)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-5)
    assert any("base_layer.weight" in n for n in ref[2]) and any("second" in n for n in ref[2])
    for n in ref[2]:
        torch.testing.assert_close(fast[2][n], ref[2][n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(r=16), dict(r=2), dict(r=1, decompose_both=True), dict(r=2, decompose_factor=4)])
def test_lokr_bypass_matches_reference(kwargs):
    model, layer = _single_layer(LoKrConfig(alpha=3, target_modules=["0"], **kwargs))
    assert layer.forward_path("default") == "bypass"
    x = torch.randn(2, 5, 48)
    ref = _outputs_and_grads(model, layer, x, fast=False)
    assert layer.forward_path("default") == "reference"
    fast = _outputs_and_grads(model, layer, x, fast=True)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(fast[2][n], ref[2][n], rtol=1e-4, atol=1e-4)
    layer.fast_path = True
    assert _saved_full_size(model, layer, x) == []


def test_lokr_prime_dimension_falls_back_to_reference():
    # 37 = 1 x 37: a Kronecker split gives nothing to save, so the product is built.
    _, layer = _single_layer(LoKrConfig(r=32, target_modules=["0"]), in_f=37, out_f=37)
    assert layer.forward_path("default") == "reference"


def test_fast_paths_compute_in_the_input_dtype():
    for config in (LoHaConfig(r=12, target_modules=["0"]), LoHaConfig(r=2, target_modules=["0"]),
                   LoKrConfig(r=4, target_modules=["0"])):
        model, layer = _single_layer(config)
        x = torch.randn(3, 48)
        expected = model(x)
        out = model.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_rank_dropout_drops_output_rows_and_module_dropout_skips():
    model, layer = _single_layer(LoKrConfig(r=4, rank_dropout=0.5, target_modules=["0"]))
    x = torch.randn(6, 48)
    with torch.no_grad():
        full = model(x)
        with model.disable_adapter():
            base = model(x)
        model.train()
        torch.manual_seed(3)
        dropped = model(x)
    kept = (dropped - full).abs().amax(0) < 1e-6
    gone = (dropped - base).abs().amax(0) < 1e-6
    assert bool((kept | gone).all()) and kept.any() and gone.any()  # whole output rows, no rescale by default

    model, layer = _single_layer(LoHaConfig(r=4, module_dropout=1.0, target_modules=["0"]))
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        assert not torch.allclose(model(x), base)  # eval: module dropout is off
        model.train()
        torch.testing.assert_close(model(x), base)


# ------------------------------------------------------------------------------------------ KronA
def test_krona_is_lokr_with_full_kronecker_factors(tmp_path):
    model, layer = _single_layer(KronAConfig(scale=0.5, target_modules=["0"]), in_f=48, out_f=40)
    assert set(layer.lokr_w1) == {"default"} and set(layer.lokr_w2) == {"default"}
    assert not any(len(getattr(layer, s)) for s in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"))
    w_a, w_b = layer.lokr_w1["default"], layer.lokr_w2["default"]
    assert w_a.shape == (5, 6) and w_b.shape == (8, 8)  # 40 = 5 x 8, 48 = 6 x 8
    assert layer.scaling["default"] == 0.5
    kron = 0.5 * torch.kron(w_a, w_b)
    torch.testing.assert_close(layer.delta_weight("default"), kron)
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x) - layer.base_layer(x), x @ kron.t(), rtol=1e-5, atol=1e-5)
    cfg = model.peft_config["default"]
    assert cfg.to_dict()["peft_type"] == "LOKR" and "scale" not in cfg.to_dict()
    assert KronAConfig.from_dict(cfg.to_dict()).scale == 0.5
    model.save_pretrained(tmp_path)
    assert type(peftkit.PeftConfig.from_pretrained(tmp_path)) is LoKrConfig


# ------------------------------------------------------------------------------------------ engine features
@pytest.mark.parametrize("make", [lambda: LoHaConfig(r=4, target_modules=["lin0", "lin1"]),
                                  lambda: LoKrConfig(r=2, target_modules=["lin0", "lin1"])])
def test_multiple_adapters_and_mixed_batch(make):
    spec = MODELS["mlp"]
    model = peftkit.get_peft_model(spec.build(), make())
    model.add_adapter("other", make())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in (".hada_", ".lokr_")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    x = spec.inputs(4)["x"]
    with torch.no_grad():
        outs = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            outs[name] = model(x)
        with model.disable_adapter():
            outs["__base__"] = model(x)
        rows = ["other", "__base__", "default", "other"]
        mixed = model(x, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], outs[name][i], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outs["default"], outs["other"])


def test_unsupported_layer_and_bad_configs_have_clear_errors():
    with pytest.raises(ValueError, match="cannot adapt"):
        peftkit.get_peft_model(MODELS["gpt2"].build(), LoHaConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="positive integer"):
        LoHaConfig(r=0)
    with pytest.raises(ValueError, match="rank_dropout"):
        LoKrConfig(rank_dropout=1.0)
    with pytest.raises(ValueError, match="init_weights"):
        LoKrConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="decompose_both"):
        KronAConfig(decompose_both=True)
