"""Bottleneck adapters (SeqBn / DoubleSeqBn / ParBn / BnConfig) and Compacter(++): the shared contract on every
family, AdapterHub's parameter counts and defaults, init, mixed batches, errors, the hook mechanism."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

from contract import Case, _out, contract_tests
from models import MODELS

import peftkit
from peftkit import (BnConfig, CompacterConfig, CompacterPlusPlusConfig, DoubleSeqBnConfig, ParBnConfig,
                     SeqBnConfig)
from peftkit.engine.sublayer import SublayerAdapterLayer

FAMILIES = ["bert", "t5", "llama", "gpt2", "vit"]
CASES = (
    [Case(f"seq_bn-{m}", m, SeqBnConfig, identity_init=False, mergeable=False) for m in FAMILIES]
    + [Case(f"double_seq_bn-{m}", m, DoubleSeqBnConfig, identity_init=False, mergeable=False) for m in FAMILIES]
    + [Case(f"par_bn-{m}", m, ParBnConfig, mergeable=False) for m in FAMILIES]
    + [Case(f"compacter-{m}", m, lambda: CompacterConfig(reduction_factor=8), identity_init=False, mergeable=False)
       for m in ["bert", "t5", "llama", "gpt2"]]
    + [Case("compacter++-llama", "llama", lambda: CompacterPlusPlusConfig(reduction_factor=8, shared_phm_rule=False),
            identity_init=False, mergeable=False)]
)
globals().update(contract_tests(CASES))


def _noise(model, adapter="default", seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters_" in n and f".{adapter}." in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------------------------------- AdapterHub parity
REFERENCE_COUNTS = {  # ../shared/reference/ADAPTERHUB.md (adapters 1.3, bare base models)
    "bert": {"seq_bn": 894_528, "double_seq_bn": 1_789_056, "par_bn": 7_091_712, "compacter": 57_088,
             "compacter++": 28_576, "seq_bn[reduction_factor=8]": 1_779_840,
             "double_seq_bn[reduction_factor=64]": 461_088},
    "t5": {"seq_bn": 1_789_056, "double_seq_bn": 3_578_112, "par_bn": 14_183_424, "compacter": 114_112,
           "compacter++": 57_088, "seq_bn[reduction_factor=8]": 3_559_680,
           "double_seq_bn[reduction_factor=64]": 922_176},
    "llama": {"seq_bn": 8_423_424, "double_seq_bn": 16_846_848, "par_bn": 67_158_016, "compacter": 202_816,
              "compacter++": 101_440, "seq_bn[reduction_factor=8]": 16_814_080,
              "double_seq_bn[reduction_factor=64]": 4_260_864},
}


def _meta_model(family):
    import transformers as tf

    with torch.device("meta"):
        if family == "bert":
            return tf.BertModel(tf.BertConfig())
        if family == "t5":
            return tf.T5Model(tf.T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128))
        return tf.LlamaModel(tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000))


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_trainable_parameters_equal_adapterhubs(family):
    base = _meta_model(family)
    for config, expected in REFERENCE_COUNTS[family].items():
        with torch.device("meta"):
            model = peftkit.get_peft_model(base, config)
        got = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert got == expected, f"{family} {config}: {got} != AdapterHub's {expected}"
        base = model.unload()
        assert not any(isinstance(m, SublayerAdapterLayer) for m in base.modules())


def test_defaults_equal_adapterhub_1_3():
    here = os.path.join(os.path.dirname(__file__), "fixtures", "adapterhub")
    for folder, cfg in [("bert-seq_bn", SeqBnConfig()), ("bert-double_seq_bn", DoubleSeqBnConfig()),
                        ("bert-par_bn", ParBnConfig()), ("bert-compacter", CompacterConfig(reduction_factor=8)),
                        ("bert-compacter++", CompacterPlusPlusConfig(reduction_factor=8))]:
        theirs = json.load(open(os.path.join(here, folder, "adapter_config.json")))["config"]
        assert cfg.adapterhub_dict() == theirs, folder


def test_config_strings():
    cfg = peftkit.engine.registry.config_from_string("seq_bn[reduction_factor=8, non_linearity=tanh, leave_out=[0,1]]")
    assert isinstance(cfg, SeqBnConfig) and cfg.reduction_factor == 8 and cfg.non_linearity == "tanh"
    assert cfg.leave_out == [0, 1]
    assert isinstance(peftkit.engine.registry.config_from_string("compacter++"), CompacterPlusPlusConfig)
    assert peftkit.engine.registry.config_from_string("par_bn[scaling=learned]").scaling == "learned"
    with pytest.raises(ValueError, match="no field 'reduction'"):
        peftkit.engine.registry.config_from_string("seq_bn[reduction=8]")
    with pytest.raises(ValueError, match="Unknown"):
        peftkit.engine.registry.config_from_string("seqbn")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="mh_adapter, output_adapter, reduction_factor"):
        BnConfig()
    with pytest.raises(ValueError, match="init_weights"):
        SeqBnConfig(init_weights="xavier")
    with pytest.raises(ValueError, match="original_ln_after"):
        SeqBnConfig(original_ln_after=False)
    base = MODELS["bert"].build()
    with pytest.raises(ValueError, match="divisible by phm_dim"):
        peftkit.get_peft_model(base, CompacterConfig())  # hidden 32 / 32 = 1
    # the failed injection left the model as it was: no wrapper, no hook, nothing frozen
    assert not any(isinstance(m, SublayerAdapterLayer) for m in base.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


# ------------------------------------------------------------------------------------------------------ init
def test_init_identity_where_the_init_is_one():
    spec = MODELS["llama"]
    base = spec.build()
    ref = _out(spec, base)
    par = peftkit.get_peft_model(copy.deepcopy(base), ParBnConfig()).eval()
    assert torch.equal(_out(spec, par), ref)
    houlsby = peftkit.get_peft_model(copy.deepcopy(base), DoubleSeqBnConfig(init_weights="houlsby")).eval()
    d_houlsby = (_out(spec, houlsby) - ref).abs().max().item()
    bert = peftkit.get_peft_model(copy.deepcopy(base), DoubleSeqBnConfig()).eval()
    d_bert = (_out(spec, bert) - ref).abs().max().item()
    assert 0 < d_houlsby < 2e-3  # near-identity: trunc-normal std 1e-2 on both projections
    assert d_bert > d_houlsby  # the default "bert" init (AdapterHub's) is not the identity, kept for parity
    compacter = peftkit.get_peft_model(copy.deepcopy(base), CompacterConfig(reduction_factor=8)).eval()
    assert (_out(spec, compacter) - ref).abs().max() < 1e-4  # shared rule N(0, 1e-4)


def test_half_precision_base_keeps_float32_adapters():
    spec = MODELS["bert"]
    base = spec.build()
    _ = torch.manual_seed(3)
    ref = peftkit.get_peft_model(copy.deepcopy(base), SeqBnConfig()).eval()
    half = copy.deepcopy(ref).to(torch.bfloat16)
    for n, p in half.named_parameters():
        if "adapters_" in n:
            p.data = p.data.float()
    out16 = _out(spec, half)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    torch.testing.assert_close(out16.float(), _out(spec, ref), atol=0.1, rtol=0.05)
    fresh = peftkit.get_peft_model(copy.deepcopy(base).to(torch.bfloat16), SeqBnConfig())
    assert {p.dtype for n, p in fresh.named_parameters() if "adapters_" in n} == {torch.float32}


# ------------------------------------------------------------------------------------- named adapters, batches
def test_mixed_batch_and_adapter_management():
    spec = MODELS["llama"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SeqBnConfig()).eval()
    model.add_adapter("par", ParBnConfig(reduction_factor=4))
    _noise(model, "default", 1)
    _noise(model, "par", 2)
    x = spec.inputs(3)
    with torch.no_grad():
        singles = {}
        for name in ("default", "par"):
            model.set_adapter(name)
            singles[name] = spec.output(model(**x))
        base_out = spec.output(base(**x))
        mixed = spec.output(model(**x, adapter_names=["par", "__base__", "default"]))
    assert (singles["default"] - base_out).abs().max() > 1e-3 and (singles["par"] - singles["default"]).abs().max() > 1e-3
    torch.testing.assert_close(mixed[0], singles["par"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], base_out[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2], singles["default"][2], atol=1e-5, rtol=0)
    # only the active adapter trains
    model.set_adapter("par")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".par." in n for n in trainable)
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(spec.output(model(**x)), base_out, atol=1e-6, rtol=0)
    model.delete_adapter("par")
    with torch.no_grad():
        torch.testing.assert_close(spec.output(model(**x)), singles["default"], atol=1e-6, rtol=0)


def test_merge_is_refused_and_unload_restores_the_base():
    spec = MODELS["bert"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), DoubleSeqBnConfig()).eval()
    _noise(model)
    before = _out(spec, model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(_out(spec, model), before)  # nothing changed
    plain = model.unload()
    assert not any(isinstance(m, SublayerAdapterLayer) for m in plain.modules())
    torch.testing.assert_close(_out(spec, plain), _out(spec, base), atol=0, rtol=0)  # the hooks are gone too


def test_gradient_checkpointing_gives_the_same_gradients():
    spec = MODELS["llama"]
    base = spec.build()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        model = peftkit.get_peft_model(copy.deepcopy(base), DoubleSeqBnConfig())
        if ckpt:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        spec.loss(model, spec.inputs(2)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------- unknown architectures
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.mix, self.norm2, self.ff = nn.LayerNorm(16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_unknown_architecture_needs_named_modules():
    with pytest.raises(ValueError, match="sublayer_modules=.*h_module"):
        peftkit.get_peft_model(Tiny(), ParBnConfig(hidden_size=16))
    cfg = DoubleSeqBnConfig(hidden_size=16, reduction_factor=4, block_pattern=r"blocks\.\d+", sublayer_modules={
        "mh_adapter": {"h_module": "mix", "x_module": "norm1"}, "output_adapter": {"h_module": "ff", "x_module": "norm2"}})
    model = peftkit.get_peft_model(Tiny(), cfg)
    assert sum(isinstance(m, SublayerAdapterLayer) for m in model.modules()) == 2
    _noise(model)
    x = torch.randn(2, 3, 16)
    # the same math by hand for block 0's attention-like sub-layer
    blk = model.get_base_model().blocks[0]
    a, ff, inner = blk.adapters_mh["default"], blk.adapters_output["default"], blk.base_layer
    with model.disable_adapter(), torch.no_grad():  # the sub-modules called directly, without the hooks
        h = inner.mix(inner.norm1(x))
        expected_mid = x + (a.adapter(h) + h)
        h2 = inner.ff(inner.norm2(expected_mid))
        expected = expected_mid + (ff.adapter(h2) + h2)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="has no module 'nope'"):
        peftkit.get_peft_model(Tiny(), ParBnConfig(hidden_size=16, block_pattern=r"blocks\.\d+",
                                                   sublayer_modules={"output_adapter": {"h_module": "nope", "x_module": "norm2"}}))


def test_qwen2_uses_the_pre_ln_placement():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    model = peftkit.get_peft_model(copy.deepcopy(base), "double_seq_bn").eval()
    layers = [m for m in model.modules() if isinstance(m, SublayerAdapterLayer)]
    assert len(layers) == 2 and all(len(m.adapters_mh) == len(m.adapters_output) == 1 for m in layers)
    par = peftkit.get_peft_model(copy.deepcopy(base), "par_bn").eval()
    with torch.no_grad():
        assert torch.equal(par(input_ids=ids).logits, ref)
        assert (model(input_ids=ids).logits - ref).abs().max() > 1e-4


def test_mixed_batch_generate_t5_with_beams():
    spec = MODELS["t5"]
    model = peftkit.get_peft_model(spec.build(), "double_seq_bn").eval()
    model.add_adapter("other", "par_bn[reduction_factor=4]")
    _noise(model, "default", 3, 0.5)
    _noise(model, "other", 4, 0.5)
    ids = spec.inputs(2)["input_ids"]
    kw = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["other", "default"], **kw)
        model.set_adapter("other")
        first = model.generate(input_ids=ids[:1], **kw)
        model.set_adapter("default")
        second = model.generate(input_ids=ids[1:], **kw)
    assert mixed[0, : first.shape[1]].tolist() == first[0].tolist()
    assert mixed[1, : second.shape[1]].tolist() == second[0].tolist()
