"""MiSS (default, mini, bat) through the shared contract, plus its own math and error checks."""

import copy

import pytest
import torch

from contract import Case, contract_tests
from models import MODELS, VIT_QV

import peftkit
from peftkit import MissConfig
from peftkit.methods.lycoris.miss import bat_delta, bat_unmerge, shard_sum, tiled_delta


def miss_case(id, model, ref=True, **kwargs):
    return Case(id, model, lambda: MissConfig(**kwargs), ref=(lambda peft: peft.MissConfig(**kwargs)) if ref else None,
                identity_init=kwargs.get("init_weights", True) is not False)


QV = ["q_proj", "v_proj"]
CASES = [
    miss_case("miss-llama", "llama", r=4, target_modules=QV),
    # 32 and 48 are not multiples of 5: the input is zero-padded to whole shards; random init; trained biases
    miss_case("miss-llama-padded-random-bias", "llama", r=5, target_modules=["q_proj", "v_proj", "down_proj"],
              init_weights=False, bias="MiSS_only"),
    miss_case("mini-llama", "llama", r=4, mini_r=8, init_weights="mini", target_modules=["q_proj", "v_proj", "up_proj"]),
    miss_case("bat-llama", "llama", r=4, init_weights="bat", target_modules="all-linear"),
    miss_case("miss-vit", "vit", r=4, target_modules=VIT_QV, modules_to_save=["classifier"]),
    miss_case("bat-vit", "vit", r=8, init_weights="bat", target_modules=VIT_QV, modules_to_save=["classifier"]),
    # GPT-2's Conv1D (weight stored in x out): Hugging Face PEFT's MiSS does not support it, so no parity case
    miss_case("miss-gpt2-conv1d", "gpt2", ref=False, r=4, target_modules=["c_attn", "c_proj"]),
    miss_case("bat-gpt2-conv1d", "gpt2", ref=False, r=4, init_weights="bat", target_modules=["c_attn"]),
]

globals().update(contract_tests(CASES))


# ------------------------------------------------------------------------------------------- the math itself
def test_shard_sum_and_tiled_delta_agree_with_dense_matmul():
    torch.manual_seed(0)
    for in_f, r in [(12, 4), (13, 4), (7, 7)]:
        block = torch.randn(r, 5)
        x = torch.randn(3, in_f)
        dense = x @ tiled_delta(block, in_f).t()
        torch.testing.assert_close(shard_sum(x, r) @ block, dense)
        # each input feature j reads row j mod r of the block
        delta = tiled_delta(block, in_f)
        for j in range(in_f):
            torch.testing.assert_close(delta[:, j], block[j % r])


def test_bat_update_is_blockwise_and_invertible():
    torch.manual_seed(0)
    out_f, in_f, r = 8, 12, 4
    w = torch.randn(out_f, in_f)
    d = torch.randn(out_f // r, r, r) * 0.1
    new = w + bat_delta(w, d)
    for i in range(out_f // r):
        for j in range(in_f // r):
            wij = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
            torch.testing.assert_close(new[i * r:(i + 1) * r, j * r:(j + 1) * r], wij + wij @ d[i] + d[i])
    torch.testing.assert_close(bat_unmerge(new, d), w, atol=1e-5, rtol=1e-5)


def test_parameter_shapes_and_counts():
    base = MODELS["llama"].build()
    for init, shape in [(True, (4, 32)), ("mini", (4, 8)), ("bat", (8, 4, 4))]:
        m = peftkit.get_peft_model(copy.deepcopy(base), MissConfig(r=4, mini_r=8, init_weights=init, target_modules=["q_proj"]))
        q = m.base_model.model.model.layers[0].self_attn.q_proj
        assert tuple(q.miss_block["default"].shape) == shape
        trainable, _ = m.get_nb_trainable_parameters()
        assert trainable == 2 * torch.Size(shape).numel()
        assert set(m.state_dict()) >= {"base_model.model.model.layers.0.self_attn.q_proj.miss_block.default"}


def test_two_adapters_add_switch_and_mixed_batch():
    spec = MODELS["llama"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=QV))
    model.add_adapter("b", MissConfig(r=4, init_weights="bat", target_modules=QV))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "miss_block" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    kw = spec.inputs(3)
    outs = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        with torch.no_grad():
            outs[name] = model(**kw).logits
    assert (outs["default"] - outs["b"]).abs().max() > 1e-3
    with torch.no_grad():
        mixed = model(**kw, adapter_names=["default", "b", "__base__"]).logits
        base_out = base(**kw).logits
    torch.testing.assert_close(mixed[0], outs["default"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], outs["b"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], base_out[2], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
def test_bat_divisibility_error_names_layer_and_sizes():
    base = MODELS["llama"].build()  # down_proj: in 48, out 32; q_proj: 32 x 32
    with pytest.raises(ValueError, match=r"down_proj.*in_features=48, out_features=32 and r=5"):
        peftkit.get_peft_model(base, MissConfig(r=5, init_weights="bat", target_modules=["down_proj"]))
    # a failed injection leaves the model untouched
    assert not any(isinstance(m, peftkit.engine.layer.AdapterLayer) for m in base.modules())


def test_mini_divisibility_and_rank_errors():
    base = MODELS["llama"].build()
    with pytest.raises(ValueError, match=r"v_proj.*out_features=16 and mini_r=5"):
        peftkit.get_peft_model(copy.deepcopy(base), MissConfig(r=4, mini_r=5, init_weights="mini", target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"r=64 is larger than in_features=32"):
        peftkit.get_peft_model(copy.deepcopy(base), MissConfig(r=64, target_modules=["q_proj"]))


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(mini_r=0), dict(init_weights="gaussian"), dict(bias="lora_only"),
                                    dict(miss_dropout=1.5)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        MissConfig(target_modules=["q_proj"], **kwargs)


def test_mixed_variants_active_together_merge_equals_unmerged():
    spec = MODELS["llama"]
    model = peftkit.get_peft_model(spec.build(), MissConfig(r=4, target_modules=QV)).eval()
    model.add_adapter("b", MissConfig(r=4, init_weights="bat", target_modules=QV))
    model.add_adapter("m", MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=QV))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "miss_block" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    before = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    for order in (["default", "b", "m"], ["b", "m", "default"]):
        model.set_adapter(order)
        with torch.no_grad():
            unmerged = model(**spec.inputs(2)).logits
            model.merge_adapter()
            merged = model(**spec.inputs(2)).logits
            model.unmerge_adapter()
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        for n, p in model.get_base_model().named_parameters():
            torch.testing.assert_close(p, before[n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("model_key,kwargs", [
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(r=4, mini_r=8, init_weights="mini", target_modules=["q_proj", "up_proj"])),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], bias="all")),
    ("llama", dict(r=5, target_modules=["q_proj", "v_proj"])),  # 32 % 5 != 0: padded shards, always merged
])
def test_fused_shard_node_equals_plain_autograd(model_key, kwargs, merged, monkeypatch):
    """Single shard adapters (default and mini) run as one autograd node, factored or with the transient merged
    weight; its outputs and gradients (block, trainable bias, input gradient) equal the plain composition's."""
    from peftkit.engine.layer import AdapterLayer
    from peftkit.methods.lycoris import miss as miss_mod

    monkeypatch.setattr(miss_mod, "miss_merged_is_cheaper", lambda *a: merged)
    fused_expected = True
    torch.manual_seed(0)
    spec = MODELS[model_key]
    model = peftkit.get_peft_model(spec.build(), MissConfig(**kwargs))
    with torch.no_grad():  # blocks away from zero so the update moves the output
        for n, p in model.named_parameters():
            if ".miss_block." in n:
                p.normal_(0, 0.3)
    inputs = spec.inputs(2)
    calls = []
    real = miss_mod._MissShardFn.apply

    def counting(*a):
        calls.append(1)
        return real(*a)

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        saved = miss_mod.MissLinear.forward_adapters
        if not fused:
            miss_mod.MissLinear.forward_adapters = AdapterLayer.forward_adapters
        miss_mod._MissShardFn.apply = counting
        try:
            out = spec.output(model(**inputs))
        finally:
            miss_mod.MissLinear.forward_adapters = saved
            miss_mod._MissShardFn.apply = real
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_out, fused_grads = run(True)
    n_layers = sum(isinstance(m, miss_mod.MissLinear) for m in model.modules())
    assert len(calls) == (n_layers if fused_expected else 0)
    ref_out, ref_grads = run(False)
    torch.testing.assert_close(fused_out, ref_out, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(fused_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
