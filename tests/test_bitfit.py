"""BitFit: the shared contract on BERT, GPT-2 (Conv1D), a Llama built with biases, ViT, Conv2d and an MLP (Hugging
Face PEFT has no BitFit, so no parity case), plus: every bias is targeted by default and nothing else trains, the
base stays bit-identical, adapters switch and mix per row, merge is an addition and unmerge restores the bits, and a
model without biases (Llama, T5) gets an error that names it."""

import copy

import pytest
import torch
from contract import Case, _close, _out, contract_tests
from models import MODELS, VOCAB, ModelSpec, _ids

import peftkit
from peftkit import BitFitConfig
from peftkit.engine.layer import AdapterLayer
from peftkit.methods.adapters.bitfit import BitFitLayer


def _llama_with_biases():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).eval()


MODELS.setdefault("llama-bias", ModelSpec(
    "llama-bias", _llama_with_biases, lambda b: {"input_ids": _ids(b)}, lambda o: o.logits,
    lambda m, kw: m(**kw, labels=kw["input_ids"]).loss))


def _perturb(model):
    """Bias differences (and a trained head copy) large enough to move a random tiny model's logits visibly."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("bitfit_" in n or ".modules_to_save." in n):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def bitfit_case(id, model, **kwargs):
    return Case(id, model, lambda: BitFitConfig(**kwargs), perturb=_perturb)


CASES = [
    bitfit_case("bitfit-bert-all-cls", "bert", modules_to_save=["classifier"]),
    bitfit_case("bitfit-gpt2-all", "gpt2"),
    bitfit_case("bitfit-llama-with-biases", "llama-bias"),
    bitfit_case("bitfit-vit-attention", "vit", target_modules=["q_proj", "k_proj", "v_proj"], modules_to_save=["classifier"]),
    bitfit_case("bitfit-conv2d", "cnn"),
    bitfit_case("bitfit-mlp-named", "mlp", target_modules=["lin0", "lin1"]),
]

globals().update(contract_tests(CASES))


def _bias_count(model, skip=()):
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith(skip))


@pytest.mark.parametrize("model", ["bert", "gpt2", "llama-bias", "vit"])
def test_all_biases_train_and_nothing_else(model):
    base = MODELS[model].build()
    peft_model = peftkit.get_peft_model(copy.deepcopy(base), BitFitConfig())
    trainable = peft_model.get_nb_trainable_parameters()[0]
    assert trainable == _bias_count(base)  # one difference per bias, of its size
    assert all(".bitfit_bias." in n for n, p in peft_model.named_parameters() if p.requires_grad)
    n_layers = sum(1 for m in peft_model.modules() if isinstance(m, BitFitLayer))
    assert n_layers == sum(1 for n, p in base.named_parameters() if n.endswith("bias"))


def test_head_in_modules_to_save_is_not_also_a_target():
    base = MODELS["bert"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), BitFitConfig(modules_to_save=["classifier"]))
    head = base.classifier.weight.numel() + base.classifier.bias.numel()
    assert model.get_nb_trainable_parameters()[0] == _bias_count(base, skip=("classifier",)) + head


def test_base_stays_intact_and_adapters_switch_and_mix():
    spec = MODELS["gpt2"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), BitFitConfig()).eval()
    model.add_adapter("b", BitFitConfig(target_modules=["c_attn", "c_fc"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bitfit_bias" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    for n, p in base.named_parameters():  # the wrapped model's own biases are untouched
        assert torch.equal(p, model.get_base_model().get_parameter(_wrapped_name(model, n))), n
    out_a = _out(spec, model, batch=4)
    model.set_adapter("b")
    out_b = _out(spec, model, batch=4)
    model.set_adapter(["default", "b"])  # differences add up
    out_ab = _out(spec, model, batch=4)
    assert (out_a - out_b).abs().max() > 1e-3 and (out_ab - out_a).abs().max() > 1e-3
    names = ["b", "__base__", "default", "b"]
    mixed = _out(spec, model, batch=4, adapter_names=names)
    base_out = _out(spec, base, batch=4)
    for i, ref in enumerate([out_b, base_out, out_a, out_b]):
        _close(mixed[i], ref[i], 1e-5, f"row {i} ({names[i]})")
    model.merge_adapter(["default", "b"])
    _close(_out(spec, model, batch=4), out_ab, 1e-5, "two adapters merged")
    model.unmerge_adapter()
    for n, p in base.named_parameters():
        assert torch.equal(p, model.get_base_model().get_parameter(_wrapped_name(model, n))), n


def _wrapped_name(model, name):
    """Name of base parameter ``name`` inside the wrapped model (``x.bias`` -> ``x.base_layer.bias``)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_base_model().get_submodule(owner)
    return f"{owner}.base_layer.{leaf}" if isinstance(module, AdapterLayer) else name


def test_merged_equals_unmerged_bit_for_bit_on_linear():
    spec = MODELS["mlp"]
    model = peftkit.get_peft_model(spec.build(), BitFitConfig()).eval()
    _perturb(model)
    unmerged = _out(spec, model)
    model.merge_adapter()
    assert torch.equal(_out(spec, model), unmerged)


@pytest.mark.parametrize("model,label", [("llama", "LlamaForCausalLM (model type 'llama')"),
                                         ("t5", "T5ForConditionalGeneration (model type 't5')")])
def test_model_without_biases_is_refused_by_name(model, label):
    base = MODELS[model].build()
    with pytest.raises(ValueError) as err:
        peftkit.get_peft_model(base, BitFitConfig())
    assert label in str(err.value) and "no bias parameters" in str(err.value)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def test_named_modules_without_bias_are_refused():
    with pytest.raises(ValueError, match="has a bias: .*q_proj"):
        peftkit.get_peft_model(MODELS["llama"].build(), BitFitConfig(target_modules=["q_proj"]))


def test_layernorm_and_generic_modules():
    """LayerNorm biases go through F.layer_norm; a module of unknown structure through functional_call."""

    class Affine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(6) * 2)
            self.bias = torch.nn.Parameter(torch.zeros(6))

        def forward(self, x):
            return torch.tanh(x * self.scale + self.bias)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(6)
            self.aff = Affine()

        def forward(self, x):
            return self.aff(self.ln(x))

    torch.manual_seed(0)
    net = Net()
    model = peftkit.get_peft_model(copy.deepcopy(net), BitFitConfig())
    with torch.no_grad():
        model.base_model.model.ln.bitfit_bias["default"].fill_(0.5)
        model.base_model.model.aff.bitfit_bias["default"].fill_(-0.25)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = torch.tanh((net.ln(x) + 0.5) * 2 - 0.25)
        _close(model(x), expected, 1e-6, "bias differences")
        mixed = model(x, adapter_names=["default", "__base__", "default"])
        _close(mixed[1], net(x)[1], 1e-6, "base row")
        _close(mixed[0], expected[0], 1e-6, "adapter row")


def test_checkpoint_holds_only_the_differences(tmp_path):
    from safetensors.torch import load_file

    base = MODELS["bert"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), BitFitConfig())
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.endswith(".bitfit_bias") for k in sd)
    assert sum(v.numel() for v in sd.values()) == _bias_count(base)
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].peft_type == "BITFIT"


def test_layernorm_over_several_dims_mixes_per_row():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.LayerNorm((3, 4)))
    model = peftkit.get_peft_model(copy.deepcopy(net), BitFitConfig())
    model.add_adapter("b", BitFitConfig())
    with torch.no_grad():
        model.base_model.model[0].bitfit_bias["default"].copy_(torch.arange(12.0).view(3, 4))
        model.base_model.model[0].bitfit_bias["b"].fill_(-1.0)
    x = torch.randn(3, 5, 3, 4)
    with torch.no_grad():
        mixed = model(x, adapter_names=["b", "default", "__base__"])
        ref = net(x)
    _close(mixed[0], ref[0] - 1.0, 1e-6, "row b")
    _close(mixed[1], ref[1] + torch.arange(12.0).view(3, 4), 1e-6, "row default")
    _close(mixed[2], ref[2], 1e-6, "base row")
