"""OFT, BOFT and HRA: the shared contract, the fast paths against the plain reference, orthogonality and
hyperspherical energy after training, PEFT parity where PEFT's own forward is sound, and size errors."""

from __future__ import annotations

import copy

import pytest
import torch

from contract import Case, contract_tests
from models import MODELS, VIT_QV

import peftkit
from peftkit import BOFTConfig, HRAConfig, OFTConfig
from peftkit.methods.orthogonal import orthogonal_ops as ops
from peftkit.methods.orthogonal.hra import orthogonality_loss
from peftkit.methods.orthogonal.oft import OFTLayer, OrthogonalLayer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: with 2 OpenMP threads on a busy 2-core machine every small op waits for the second
    thread to be scheduled (measured: 2.4 s instead of 9 ms per training step). One thread, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def case(id, model, cls, ref_name, ref=True, identity_init=True, perturb=None, **kwargs):
    return Case(id, model, lambda: cls(**kwargs), ref=(lambda peft: getattr(peft, ref_name)(**kwargs)) if ref else None,
                atol=1e-5, identity_init=identity_init, perturb=perturb)


def _perturb_then_project(model):
    """COFT projects its parameters in every forward (as PEFT does); perturb inside the allowed ball."""
    from contract import _perturb_default

    _perturb_default(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "oft_R" in n:
                p.copy_(ops.coft_project(p, 0.5))


QV = ["q_proj", "v_proj"]
CASES = [
    case("oft-llama-neumann", "llama", OFTConfig, "OFTConfig", oft_block_size=8,
         target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"]),
    case("oft-vit", "vit", OFTConfig, "OFTConfig", oft_block_size=8, target_modules=VIT_QV, modules_to_save=["classifier"]),
    # PEFT's unmerged OFT Conv2d forward sums overlapping patches (not even identity at init); parity for conv is
    # checked against PEFT's merged model in test_oft_conv_matches_peft_merged.
    case("oft-cnn", "cnn", OFTConfig, "OFTConfig", ref=False, oft_block_size=8, target_modules=["conv0", "conv1"]),
    case("boft-llama", "llama", BOFTConfig, "BOFTConfig", boft_block_size=4, target_modules=QV + ["up_proj"]),
    case("boft-cnn", "cnn", BOFTConfig, "BOFTConfig", boft_block_size=9, target_modules=["conv0", "conv1"]),
    case("hra-llama", "llama", HRAConfig, "HRAConfig", r=4, target_modules="all-linear"),
    case("hra-cnn", "cnn", HRAConfig, "HRAConfig", r=4, target_modules=["conv0", "conv1"]),
    case("oft-llama-exact-r-share", "llama", OFTConfig, "OFTConfig", r=4, oft_block_size=0, use_cayley_neumann=False,
         block_share=True, target_modules=QV),
    case("oft-llama-coft", "llama", OFTConfig, "OFTConfig", oft_block_size=4, coft=True, eps=0.5, target_modules=QV,
         perturb=_perturb_then_project),
    # PEFT forces boft_n_butterfly_factor=1 without its CUDA extension, so factors > 1 have no PEFT parity on CPU;
    # test_butterfly_matches_peft_permutations checks them against PEFT's permutation matrices instead.
    case("boft-llama-butterfly", "llama", BOFTConfig, "BOFTConfig", ref=False, boft_block_size=0, boft_block_num=8,
         boft_n_butterfly_factor=3, target_modules=QV),
    case("boft-vit", "vit", BOFTConfig, "BOFTConfig", boft_block_size=4, target_modules=VIT_QV,
         modules_to_save=["classifier"]),
    # Gram-Schmidt of the paired init vectors orthonormalises rounding noise (in PEFT too): not the identity.
    case("hra-llama-gs", "llama", HRAConfig, "HRAConfig", identity_init=False, r=4, apply_GS=True, target_modules=QV),
    case("hra-vit", "vit", HRAConfig, "HRAConfig", r=2, target_modules=VIT_QV, modules_to_save=["classifier"]),
]

globals().update(contract_tests(CASES))


def _perturb(model, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("oft_" in n or "hra_" in n):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _layers(model, cls=OrthogonalLayer):
    return [m for m in model.modules() if isinstance(m, cls)]


# ---------------------------------------------------------------------------------------------- pure functions
def test_cayley_exact_is_orthogonal_and_neumann_close():
    q = ops.skew_from_vector(torch.randn(3, 6) * 0.05, 4)
    assert torch.allclose(q, -q.transpose(-1, -2))
    r = ops.cayley_exact(q)
    eye = torch.eye(4).expand(3, 4, 4)
    assert torch.allclose(r.transpose(-1, -2) @ r, eye, atol=1e-6)
    # PEFT's Neumann form approximates (I + Q)(I - Q)^-1 = R^T
    assert torch.allclose(ops.cayley_neumann(q, 8), r.transpose(-1, -2), atol=1e-6)


def test_householder_wy_form_equals_chain():
    u = torch.randn(12, 5, dtype=torch.float64)
    x = torch.randn(7, 12, dtype=torch.float64)
    h = ops.householder_dense(u, apply_gs=False)
    assert torch.allclose(ops.householder_rotate_input(x, u, False), x @ h.t())
    assert torch.allclose(ops.householder_dense(u, False, transpose=True), h.t())
    assert torch.allclose(h.t() @ h, torch.eye(12, dtype=torch.float64))
    # Gram-Schmidt form equals the loop of classical Gram-Schmidt steps
    cols = []
    for i in range(5):
        v = u[:, i]
        for c in cols:
            v = v - (c @ v) * c
        cols.append(v / v.norm())
    q = torch.stack(cols, 1)
    assert torch.allclose(ops.householder_dense(u, True), torch.eye(12, dtype=torch.float64) - 2 * q @ q.t())


def test_butterfly_matches_peft_permutations():
    """Our permutations and factor order equal PEFT's (its GPU path: P_i blockdiag(B_i) P_i^T, chained)."""
    boft_layer = pytest.importorskip("peft.tuners.boft.layer")
    dim, block, m = 32, 4, 3
    num = dim // block
    helper = boft_layer.BOFTLayer.__new__(boft_layer.BOFTLayer)
    blocks = ops.cayley_exact(ops.skew_from_vector(torch.randn(m * num, block * (block - 1) // 2), block))
    blocks = blocks.view(m, num, block, block)
    expected = None
    perms = ops.butterfly_permutations(dim, num, block, m)
    for i in range(m):
        ref_perm = helper.block_butterfly_perm(dim, num // 2 ** i, block // 2, m - 1)
        assert torch.equal(perms[i], ref_perm)
        p = helper.perm2mat(ref_perm)
        mi = p @ torch.block_diag(*blocks[i]) @ p.t()
        expected = mi if expected is None else mi @ expected
    inv = [torch.argsort(p) for p in perms]
    assert torch.allclose(ops.butterfly_dense(blocks, perms), expected, atol=1e-6)
    x = torch.randn(5, dim)
    assert torch.allclose(ops.butterfly_rotate_input(x, blocks, perms, inv), x @ expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------- fast vs reference
FAST_CASES = [
    ("oft", lambda: OFTConfig(oft_block_size=8, target_modules=QV)),
    ("oft-exact-share", lambda: OFTConfig(oft_block_size=8, use_cayley_neumann=False, block_share=True,
                                          target_modules=QV)),
    ("boft", lambda: BOFTConfig(boft_block_size=4, target_modules=QV)),
    ("boft-butterfly", lambda: BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=QV)),
    ("hra", lambda: HRAConfig(r=4, target_modules=QV)),
    ("hra-mlp-bias", lambda: HRAConfig(r=4, target_modules=["lin1"], bias="hra_only")),
    ("oft-mlp-bias", lambda: OFTConfig(oft_block_size=8, target_modules=["lin1"], bias="oft_only")),
    ("boft-mlp-bias", lambda: BOFTConfig(boft_block_size=4, target_modules=["lin1"], bias="boft_only")),
    ("hra-gs", lambda: HRAConfig(r=3, apply_GS=True, target_modules=QV)),
]


@pytest.mark.parametrize("make", [c[1] for c in FAST_CASES], ids=[c[0] for c in FAST_CASES])
def test_fast_path_matches_reference_outputs_and_grads(make):
    config = make()
    model = peftkit.get_peft_model(MODELS["mlp" if config.target_modules == ["lin1"] else "llama"].build(), config)
    _perturb(model)
    layer = _layers(model)[0]
    names = ["default"]
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    params = [p for _, p in layer.adapter_parameters("default")]
    if config.bias != "none":
        params.append(layer.get_base_layer().bias)
        assert params[-1].requires_grad
    fast = layer.forward_adapters(x, names)
    grads_fast = torch.autograd.grad((fast * torch.cos(fast)).sum(), [x] + params)
    ref = layer.forward_reference(x, names)
    grads_ref = torch.autograd.grad((ref * torch.cos(ref)).sum(), [x] + params)
    assert torch.allclose(fast, ref, atol=1e-5)
    for a, b in zip(grads_fast, grads_ref):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_two_active_adapters_merge_equals_unmerged():
    spec = MODELS["llama"]
    model = peftkit.get_peft_model(spec.build(), OFTConfig(oft_block_size=8, target_modules=QV))
    model.add_adapter("other", OFTConfig(oft_block_size=4, target_modules=QV))
    model.base_model.set_adapter(["default", "other"])
    _perturb(model)
    model.eval()
    kw = spec.inputs(2)
    with torch.no_grad():
        unmerged = model(**kw).logits
        with model.disable_adapter():
            base = model(**kw).logits
        model.base_model.merge_adapter()
        merged = model(**kw).logits
        model.base_model.unmerge_adapter()
        again = model(**kw).logits
    assert (unmerged - base).abs().max() > 1e-3
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert torch.allclose(again, unmerged, atol=1e-4)


def test_mixed_batch_rows_use_their_adapter():
    spec = MODELS["llama"]
    model = peftkit.get_peft_model(spec.build(), BOFTConfig(boft_block_size=4, init_weights=False, target_modules=QV))
    model.add_adapter("b", BOFTConfig(boft_block_size=8, init_weights=False, target_modules=QV))
    model.eval()
    kw = spec.inputs(3)
    with torch.no_grad():
        mixed = model(**kw, adapter_names=["default", "b", "__base__"]).logits
        a = model(**kw).logits
        model.set_adapter("b")
        b = model(**kw).logits
        with model.disable_adapter():
            base = model(**kw).logits
    assert torch.allclose(mixed[0], a[0], atol=1e-5)
    assert torch.allclose(mixed[1], b[1], atol=1e-5)
    assert torch.allclose(mixed[2], base[2], atol=1e-5)


def test_mixed_batch_conv_and_embedding():
    spec = MODELS["cnn"]
    model = peftkit.get_peft_model(spec.build(), HRAConfig(r=2, init_weights=False, target_modules=["conv0", "conv1"]))
    model.eval()
    kw = spec.inputs(2)
    with torch.no_grad():
        mixed = model(**kw, adapter_names=["__base__", "default"])
        adapted = model(**kw)
        with model.disable_adapter():
            base = model(**kw)
    assert torch.allclose(mixed[0], base[0], atol=1e-5) and torch.allclose(mixed[1], adapted[1], atol=1e-5)
    spec = MODELS["llama"]
    model = peftkit.get_peft_model(spec.build(), OFTConfig(oft_block_size=8, init_weights=False,
                                                           target_modules=["embed_tokens", "q_proj"]))
    model.eval()
    kw = spec.inputs(2)
    with torch.no_grad():
        mixed = model(**kw, adapter_names=["default", "__base__"]).logits
        adapted = model(**kw).logits
        with model.disable_adapter():
            base = model(**kw).logits
    assert torch.allclose(mixed[0], adapted[0], atol=1e-5) and torch.allclose(mixed[1], base[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------- orthogonality
def _train(model, spec, steps=5, lr=5e-2, extra_loss=None):
    model.train()
    kw = spec.inputs(4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = spec.loss(model, kw)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _cosine(w):
    w = w.reshape(w.shape[0], -1)
    w = w / w.norm(dim=1, keepdim=True)
    return w @ w.t()


ORTHO_CASES = [
    ("oft-exact", "llama", lambda: OFTConfig(oft_block_size=8, use_cayley_neumann=False, target_modules=QV)),
    ("boft", "llama", lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=QV)),
    ("hra", "llama", lambda: HRAConfig(r=4, target_modules=QV)),
    ("hra-gs", "llama", lambda: HRAConfig(r=4, apply_GS=True, target_modules=QV)),
    ("oft-cnn", "cnn", lambda: OFTConfig(oft_block_size=8, use_cayley_neumann=False, target_modules=["conv1"])),
    ("hra-cnn", "cnn", lambda: HRAConfig(r=2, target_modules=["conv1"])),
]


@pytest.mark.parametrize("model_name,make", [(c[1], c[2]) for c in ORTHO_CASES], ids=[c[0] for c in ORTHO_CASES])
def test_trained_transform_is_orthogonal_and_keeps_hyperspherical_energy(model_name, make):
    spec = MODELS[model_name]
    model = peftkit.get_peft_model(spec.build(), make())
    _train(model, spec)
    for layer in _layers(model):
        with torch.no_grad():
            r = layer._rotation("default").double()
            moved = (r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max()
            assert moved > 1e-4, "training did not move the transform"
            assert torch.allclose(r.t() @ r, torch.eye(r.shape[0], dtype=r.dtype), atol=1e-5)
            w = layer.get_base_layer().weight
            adapted = layer.effective_weight(["default"])
            # the neurons' pairwise angles (hyperspherical energy) are unchanged, BOFT's scale included
            assert torch.allclose(_cosine(adapted), _cosine(w), atol=1e-5)


def test_neumann_oft_is_nearly_orthogonal_and_coft_stays_near_identity():
    spec = MODELS["llama"]
    model = peftkit.get_peft_model(spec.build(), OFTConfig(oft_block_size=8, target_modules=QV))
    _train(model, spec, steps=3, lr=1e-2)
    for layer in _layers(model):
        with torch.no_grad():
            r = layer._rotation("default")
            assert (r.t() @ r - torch.eye(r.shape[0])).abs().max() < 1e-3
    eps = 1e-3
    coft = peftkit.get_peft_model(spec.build(), OFTConfig(oft_block_size=8, coft=True, eps=eps, target_modules=QV))
    _train(coft, spec, steps=3, lr=0.5)
    with torch.no_grad():
        coft(**spec.inputs(1))  # forward applies the projection, as in PEFT
        for layer in _layers(coft):
            vec = layer.oft_R["default"].weight
            q = ops.skew_from_vector(vec, 8)
            assert q.flatten(1).norm(dim=1).max() <= eps / vec.shape[0] ** 0.5 * (1 + 1e-4)
            assert q.abs().max() > 0


def test_hra_orthogonality_loss_is_a_trainable_term():
    spec = MODELS["llama"]
    model = peftkit.get_peft_model(spec.build(), HRAConfig(r=4, init_weights=False, target_modules=QV))
    before = orthogonality_loss(model).item()
    assert before > 0
    assert torch.allclose(model.orthogonality_loss(weight=2.0), 2 * orthogonality_loss(model))
    loss = model.orthogonality_loss()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "hra_u" in n)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        model.orthogonality_loss().backward()
        opt.step()
    assert orthogonality_loss(model).item() < before * 0.5


# ---------------------------------------------------------------------------------------------- PEFT conv parity
def test_oft_conv_matches_peft_merged(tmp_path):
    peft = pytest.importorskip("peft")
    spec = MODELS["cnn"]
    base = spec.build()
    kwargs = dict(oft_block_size=8, target_modules=["conv0", "conv1"])
    ours = peftkit.get_peft_model(copy.deepcopy(base), OFTConfig(**kwargs)).eval()
    _perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    x = spec.inputs(2)
    with torch.no_grad():
        expected = ours(**x)
        merged_ref = theirs.merge_and_unload()(**x)
    assert torch.allclose(expected, merged_ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="oft_block_size=0"):
        OFTConfig(r=4)
    with pytest.raises(ValueError, match="both are 0"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(ValueError, match="boft_block_size=0"):
        BOFTConfig(boft_block_num=4)
    with pytest.raises(ValueError, match=">= 1"):
        BOFTConfig(boft_n_butterfly_factor=0)
    with pytest.raises(ValueError, match="positive"):
        HRAConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        OFTConfig(bias="lora_only")


def test_boft_size_errors():
    spec = MODELS["llama"]  # hidden size 32
    with pytest.raises(ValueError, match="not divisible by boft_block_size=5"):
        peftkit.get_peft_model(spec.build(), BOFTConfig(boft_block_size=5, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"boft_block_size \* 2\*\*3"):
        peftkit.get_peft_model(spec.build(), BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=4,
                                                        target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="even"):
        peftkit.get_peft_model(spec.build(), BOFTConfig(boft_block_size=1, boft_n_butterfly_factor=2,
                                                        target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="divisible by 2"):
        peftkit.get_peft_model(spec.build(), BOFTConfig(boft_block_size=0, boft_block_num=1, boft_n_butterfly_factor=2,
                                                        target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="larger than"):
        peftkit.get_peft_model(spec.build(), HRAConfig(r=40, target_modules=["q_proj"]))


def test_oft_adjusts_block_size_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    spec = MODELS["llama"]
    base = spec.build()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(oft_block_size=6, target_modules=["q_proj"]))
    ref.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    layer = _layers(loaded, OFTLayer)[0]
    assert layer.oft_block_size["default"] == 4  # 6 does not divide 32; PEFT's rule picks 4 (ties go down)
