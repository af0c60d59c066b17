"""PEFT 0.21 LoRA features (issue 17, part f17a): lora_bias, target_parameters, trainable_token_indices (with tied
embeddings and ensure_weight_tying), nn.MultiheadAttention, DoRA on grouped convolutions, and the rest of PEFT's
LoraConfig fields. Each feature is checked against Hugging Face PEFT given the same weights: outputs, checkpoint
keys (both directions) and merges."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit import LoraConfig, PeftModel, PeftWarning, get_peft_model

peft = pytest.importorskip("peft")

ATOL = 1e-5


def _both(base: nn.Module, **kw):
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    return ours, theirs


def _randomize(model: nn.Module, words=("lora_", "trainable_tokens")) -> None:
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(w in name for w in words):
                p.add_(torch.randn_like(p) * 0.3)


def _adapter_keys(model: nn.Module) -> set:
    return {k for k, _ in model.named_parameters() if _.requires_grad}


def _copy_into_ours(ours, theirs) -> None:
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def _file_keys(model, path) -> set:
    model.save_pretrained(str(path))
    return set(load_file(str(path / "adapter_model.safetensors")))


def _roundtrip_both_ways(ours, theirs, base, x, tmp_path, call=lambda m, x: m(x)):
    """A PEFT checkpoint loads into peftkit and a peftkit checkpoint into PEFT, with the same outputs."""
    expected = call(theirs, x)
    keys_theirs = _file_keys(theirs, tmp_path / "theirs")
    keys_ours = _file_keys(ours, tmp_path / "ours")
    assert keys_ours == keys_theirs
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs"))
    torch.testing.assert_close(call(loaded, x), expected, atol=ATOL, rtol=0)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(call(back, x), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 16, bias=bias)
        self.lin1 = nn.Linear(16, 4, bias=bias)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class ConvNet(nn.Module):
    def __init__(self, bias: bool = True, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=groups, bias=bias)
        self.lin = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).flatten(1))


class ParamLinear(nn.Module):
    """A layer that uses its weight directly (weight stored in x out), so only target_parameters can reach it."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) / i ** 0.5)
        self.bias = nn.Parameter(torch.zeros(o))

    def forward(self, x):
        return x @ self.weight + self.bias


class ParamMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = ParamLinear(10, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class Experts(nn.Module):
    """MoE-style experts: stacked (experts, ., .) tensors used by bmm; ``is_transposed`` flips their layout."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        e, d, h = 3, 6, 5
        self.is_transposed = transposed
        self.gate_up_proj = nn.Parameter(torch.randn(e, h, d) if transposed else torch.randn(e, d, h))
        self.down_proj = nn.Parameter(torch.randn(e, d, h) if transposed else torch.randn(e, h, d))

    def forward(self, x):  # x: (experts, tokens, d)
        g = self.gate_up_proj.transpose(1, 2) if self.is_transposed else self.gate_up_proj
        dp = self.down_proj.transpose(1, 2) if self.is_transposed else self.down_proj
        return torch.bmm(torch.relu(torch.bmm(x, g)), dp)


class MoE(nn.Module):
    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.experts = Experts(transposed)

    def forward(self, x):
        return self.experts(x)


class MHANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin0 = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


# ---------------------------------------------------------------------------------------------- lora_bias
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lora_bias_matches_peft_forward_keys_merge(kind, tmp_path):
    torch.manual_seed(0)
    base, x, target = (MLP(), torch.randn(5, 10), ["lin0", "lin1"]) if kind == "linear" else (
        ConvNet(), torch.randn(2, 4, 6, 6), ["conv"])
    ours, theirs = _both(base, target_modules=target, lora_bias=True, lora_alpha=32)
    assert ours.base_model.model.get_submodule(target[0]).lora_B["default"].bias is not None
    assert _adapter_keys(ours) == _adapter_keys(theirs)  # lora_B.default.bias trains
    _randomize(theirs)
    _copy_into_ours(ours, theirs)
    expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
    _roundtrip_both_ways(ours, theirs, base, x, tmp_path)
    assert any(k.endswith("lora_B.bias") for k in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    layer = ours.base_model.model.get_submodule(target[0])
    bias_before = layer.get_base_layer().bias.detach().clone()
    ours.merge_adapter()
    assert not torch.equal(layer.get_base_layer().bias, bias_before)  # LoRA-B's bias went into the base bias
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().bias, bias_before, atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, atol=ATOL, rtol=0)


def test_lora_bias_without_base_bias_warns_and_merge_refuses_unchanged():
    with pytest.warns(PeftWarning, match="has no bias"):
        model = get_peft_model(MLP(bias=False), LoraConfig(target_modules=["lin0"], lora_bias=True))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1.0)
    before = layer.get_base_layer().weight.detach().clone()
    for safe in (False, True):
        with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
            model.merge_adapter(safe_merge=safe)
        assert torch.equal(layer.get_base_layer().weight, before) and layer.merged_adapters == []


def test_lora_bias_safe_merge_with_nonfinite_bias_changes_nothing():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], lora_bias=True))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.lora_B["default"].bias.fill_(float("inf"))
    w, b = layer.get_base_layer().weight.detach().clone(), layer.get_base_layer().bias.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, w) and torch.equal(layer.get_base_layer().bias, b)


def test_lora_bias_refusals():
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig(target_modules=["lin0"], lora_bias=True, use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights="gaussian")
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="lora_bias=True is not supported for nn.Embedding"):
        get_peft_model(emb, LoraConfig(target_modules=["0"], lora_bias=True))
    assert isinstance(emb[0], nn.Embedding)  # left unchanged


# ------------------------------------------------------------------------------------ grouped conv + DoRA
@pytest.mark.parametrize("groups", [2, 4])
def test_dora_on_grouped_conv_matches_peft(groups, tmp_path):
    torch.manual_seed(0)
    base, x = ConvNet(groups=groups), torch.randn(2, 4, 6, 6)
    _, theirs = _both(base, target_modules=["conv"], use_dora=True, r=4)
    _randomize(theirs)  # B (and the magnitude) away from their init: the weight-norm term matters
    theirs.save_pretrained(str(tmp_path / "src"))
    ours = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "src"))
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)
    _roundtrip_both_ways(ours, theirs, base, x, tmp_path)
    with pytest.raises(NotImplementedError, match="grouped convolution"):
        ours.merge_adapter()  # PEFT cannot merge grouped convolutions either


def test_grouped_conv_rank_not_divisible_by_groups_is_refused_like_peft():
    with pytest.raises(ValueError, match="rank divisible by groups"):
        get_peft_model(ConvNet(groups=4), LoraConfig(target_modules=["conv"], r=6))
    with pytest.raises(ValueError):
        peft.get_peft_model(ConvNet(groups=4), peft.LoraConfig(target_modules=["conv"], r=6))


# ------------------------------------------------------------------------------------- target_parameters
def test_target_parameters_2d_matches_peft(tmp_path):
    torch.manual_seed(0)
    base, x = ParamMLP(), torch.randn(4, 10)
    ours, theirs = _both(base, target_modules=["lin1"], target_parameters=["lin0.weight"], init_lora_weights=False)
    assert isinstance(ours.base_model.model.lin0, peftkit.ParamWrapper)
    assert _adapter_keys(ours) == _adapter_keys(theirs)
    _copy_into_ours(ours, theirs)
    expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
    ours(x).sum().backward()
    assert ours.base_model.model.lin0.lora_B["default"].weight.grad is not None
    assert ours.base_model.model.lin0.base_layer.weight.grad is None  # the base parameter stays frozen
    assert type(ours.base_model.model.lin0.base_layer) is ParamLinear  # no parametrization left after forward
    _roundtrip_both_ways(ours, theirs, base, x, tmp_path)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.base_model.model.lin0.base_layer.weight, base.lin0.weight, atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert type(merged.lin0) is ParamLinear
    torch.testing.assert_close(merged(x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_target_parameters_moe_experts_match_peft(transposed, tmp_path):
    torch.manual_seed(0)
    base, x = MoE(transposed), torch.randn(3, 4, 6)
    ours, theirs = _both(base, target_modules=[], init_lora_weights=False,
                         target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if "lora_" in k}  # noqa: E731
    assert shapes(ours) == shapes(theirs)  # same nesting (experts.base_layer...), same factor layout
    _copy_into_ours(ours, theirs)
    expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
    _roundtrip_both_ways(ours, theirs, base, x, tmp_path)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    merged = ours.merge_and_unload()
    assert type(merged.experts) is Experts
    torch.testing.assert_close(merged(x), expected, atol=ATOL, rtol=0)


def test_target_parameters_second_adapter_and_refusals():
    model = get_peft_model(ParamMLP(), LoraConfig(target_modules=[], target_parameters=["lin0.weight"]))
    model.add_adapter("other", LoraConfig(target_modules=[], target_parameters=["lin0.weight"]))
    assert set(model.base_model.model.lin0.lora_A) == {"default", "other"}  # one wrapper, both adapters
    with pytest.raises(ValueError, match="all adapters must target the same set"):
        model.add_adapter("third", LoraConfig(target_modules=[], target_parameters=["lin1.weight"]))
    assert "third" not in model.peft_config
    with pytest.raises(ValueError, match="lora_dropout"):
        get_peft_model(ParamMLP(), LoraConfig(target_modules=[], target_parameters=["lin0.weight"], lora_dropout=0.1))
    with pytest.raises(ValueError, match="target_modules already adapts"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], target_parameters=["lin0.weight"]))
    with pytest.raises(TypeError, match="target_parameters must be a list"):
        LoraConfig(target_parameters="lin0.weight")
    with pytest.raises(ValueError, match="mixed adapter batches"):
        model(torch.randn(2, 10), adapter_names=["default", "other"])


# ------------------------------------------------------------------------------- trainable_token_indices
@pytest.mark.parametrize("spec", [dict(trainable_token_indices=[1, 3, 5]),
                                  dict(trainable_token_indices={"embed_tokens": [2, 7]}, ensure_weight_tying=True)])
def test_trainable_tokens_tied_embeddings_match_peft(spec, tmp_path):
    base = _tied_llama()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    ours, theirs = _both(base, target_modules=["q_proj"], init_lora_weights=False, **spec)
    assert isinstance(ours.base_model.model.lm_head, peftkit.TrainableTokensWrapper)  # follows the tied embedding
    assert _adapter_keys(ours) == _adapter_keys(theirs)
    _randomize(theirs, words=("trainable_tokens",))
    _copy_into_ours(ours, theirs)
    logits = lambda m, x: m(x).logits  # noqa: E731
    expected = logits(theirs, ids)
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)
    _roundtrip_both_ways(ours, theirs, base, ids, tmp_path, call=logits)
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    assert not any("lm_head" in k for k in keys)  # the tied layer saves nothing of its own
    emb = ours.base_model.model.model.embed_tokens
    original = emb.token_adapter.get_base_layer().weight.detach().clone()
    ours.merge_adapter()
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    assert torch.equal(emb.token_adapter.get_base_layer().weight, original)
    merged = ours.merge_and_unload()
    assert type(merged.model.embed_tokens) is nn.Embedding and type(merged.lm_head) is nn.Linear
    torch.testing.assert_close(merged(ids).logits, expected, atol=ATOL, rtol=0)


def test_trainable_tokens_ensure_weight_tying_and_conflicts():
    base = _tied_llama()
    with pytest.raises(ValueError, match="Cannot ensure weight tying"):
        get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True,
                                                       trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}))
    untied = MLPWithEmb()
    with pytest.warns(UserWarning, match="ensure_weight_tying=True but the model does not have tied weights"):
        get_peft_model(untied, LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0]},
                                          ensure_weight_tying=True))
    with pytest.raises(ValueError, match="modules_to_save"):
        get_peft_model(MLPWithEmb(), LoraConfig(target_modules=["lin0"], modules_to_save=["emb"],
                                                trainable_token_indices={"emb": [0]}))
    with pytest.raises(ValueError, match="outside"):
        get_peft_model(MLPWithEmb(), LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [99]}))


class MLPWithEmb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 10)
        self.lin0 = nn.Linear(10, 4)

    def forward(self, x):
        return self.lin0(self.emb(x)).sum(1)


def test_trainable_tokens_two_adapters_one_at_a_time():
    model = get_peft_model(MLPWithEmb(), LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0]}))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [0]}))
    wrapper = model.base_model.model.emb
    assert wrapper.active_adapters == ["default"]
    assert wrapper.token_adapter.trainable_tokens_delta["other"].requires_grad is False
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for TrainableTokensWrapper"):
        model.base_model.set_adapter(["default", "other"])
    model.set_adapter("other")
    assert wrapper.active_adapters == ["other"]
    assert wrapper.token_adapter.trainable_tokens_delta["other"].requires_grad is True
    assert wrapper.token_adapter.trainable_tokens_delta["default"].requires_grad is False
    model.delete_adapter("default")
    assert set(wrapper.token_adapter.trainable_tokens_delta) == {"other"}
    assert set(wrapper.token_adapter.trainable_tokens_original) == {"other"}


def test_trainable_tokens_only_chosen_rows_change_in_training():
    model = get_peft_model(MLPWithEmb(), LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [1, 4]}))
    ids = torch.tensor([[1, 2, 4, 5]])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = model.base_model.model.emb.weight.detach().clone()
    model(ids).sum().backward()
    opt.step()
    after = model.base_model.model.emb.weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 4]


# ---------------------------------------------------------------------------------- nn.MultiheadAttention
@pytest.mark.parametrize("targets", [["mha"], ["mha", "lin0"]])
def test_multihead_attention_matches_peft(targets, tmp_path):
    torch.manual_seed(0)
    base, x = MHANet(), torch.randn(2, 5, 8)
    ours, theirs = _both(base, target_modules=targets, init_lora_weights=False)
    assert _adapter_keys(ours) == _adapter_keys(theirs)
    _copy_into_ours(ours, theirs)
    expected = theirs(x)
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
    ours(x).sum().backward()
    mha = ours.base_model.model.mha
    assert mha.lora_A["default"].weight.grad is not None
    assert mha.base_layer.out_proj.lora_A["default"].weight.grad is not None
    assert mha.base_layer.in_proj_weight.requires_grad is False and mha.base_layer.in_proj_weight.grad is None
    _roundtrip_both_ways(ours, theirs, base, x, tmp_path)
    with ours.disable_adapter():
        torch.testing.assert_close(ours(x), base(x), atol=ATOL, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(mha.base_layer.in_proj_weight, base.mha.in_proj_weight, atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention and not isinstance(merged.mha.out_proj, peftkit.engine.layer.AdapterLayer)
    torch.testing.assert_close(merged(x), expected, atol=ATOL, rtol=0)


def test_multihead_attention_refusals():
    model = get_peft_model(MHANet(), LoraConfig(target_modules=["mha"]))
    model.add_adapter("other", LoraConfig(target_modules=["mha"]))
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        model(torch.randn(2, 5, 8), adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="DoRA"):
        get_peft_model(MHANet(), LoraConfig(target_modules=["mha"], use_dora=True))
    odd = nn.Sequential()
    odd.add_module("mha", nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(ValueError, match="same size"):
        get_peft_model(odd, LoraConfig(target_modules=["mha"]))


# ---------------------------------------------------------------------------------------- config fields
F17C_FIELDS = {"eva_config", "corda_config", "loftq_config"}  # data-driven inits: another part of issue 17


def test_every_peft_lora_config_field_exists():
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    assert theirs - ours <= F17C_FIELDS


@pytest.mark.parametrize("field, value", [
    ("use_bdlora", {"a_only": True}), ("velora_config", {"num_groups": 2}), ("kasa_config", {}),
    ("monteclora_config", {"num_samples": 2}), ("arrow_config", {"top_k": 2}), ("use_qalora", True),
    ("alora_invocation_tokens", [1, 2]), ("megatron_config", {"x": 1}),
    ("lora_ga_config", {"batch_size": 2}),
])
def test_unsupported_lora_variants_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}.*not supported"):
        LoraConfig(target_modules=["lin0"], **{field: value})


def test_peft_written_config_with_new_fields_round_trips(tmp_path):
    cfg = peft.LoraConfig(target_modules=["lin0"], lora_bias=True, trainable_token_indices={"emb": [1]},
                          target_parameters=["lin1.weight"], ensure_weight_tying=False)
    cfg.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of it is dropped
        ours = LoraConfig.from_pretrained(str(tmp_path))
    assert ours.lora_bias is True and ours.trainable_token_indices == {"emb": [1]}
    assert ours.target_parameters == ["lin1.weight"]
    assert "runtime_config" not in ours.to_dict()


# -------------------------------------------------------------------------------------- layer_replication
def test_layer_replication_matches_peft(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    ours, theirs = _both(base, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                         layer_replication=[[0, 2], [1, 3]])
    layers = ours.base_model.model.model.layers
    assert len(layers) == 4 and ours.base_model.model.config.num_hidden_layers == 4
    # layers 1 and 2 are copies of original layer 1: shared base weight, separate adapters
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    assert layers[1].self_attn.q_proj.lora_A["default"].weight is not layers[2].self_attn.q_proj.lora_A["default"].weight
    _copy_into_ours(ours, theirs)
    logits = lambda m, x: m(x).logits  # noqa: E731
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=0)
    _roundtrip_both_ways(ours, theirs, base, ids, tmp_path, call=logits)
    with pytest.raises(ValueError, match="replicated"):
        ours.merge_adapter()
    with pytest.raises(ValueError, match="layer_replication"):
        get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 9]]))
