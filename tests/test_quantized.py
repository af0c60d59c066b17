"""LoRA and DoRA on quantised bases, on CPU: bitsandbytes 4-bit NF4 with double quantisation (QLoRA), bitsandbytes
8-bit (LLM.int8), torchao int8 weight-only and torchao int4 weight-only (IntxWeightOnlyConfig: torchao's
Int4WeightOnlyConfig has no CPU kernel in 0.18).

Each backend is skipped when its package is not installed. The tiny Llama is saved once and loaded quantised
through transformers, as users do."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import peftkit
from peftkit.integrations import quantization as quant

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden 64 (not the zoo's 32): bitsandbytes' CPU inference kernel needs in_features >= its 4-bit block (64)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _quant_config(kind):
    import transformers

    if kind == "bnb-nf4":
        pytest.importorskip("bitsandbytes")
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    if kind == "bnb-8bit":
        pytest.importorskip("bitsandbytes")
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    if kind == "torchao-int8":
        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    return transformers.TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16)))


def load_quantized(path, kind, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=_quant_config(kind), device_map="cpu",
                                                     dtype=dtype)
    except (ImportError, RuntimeError, NotImplementedError) as exc:  # a backend without a CPU path here
        pytest.skip(f"{kind} does not load on this machine: {exc}")
    return model.eval()


BACKENDS = ["bnb-nf4", "bnb-8bit", "torchao-int8", "torchao-int4"]
METHODS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=QV),
    "dora": dict(r=4, lora_alpha=8, target_modules=QV, use_dora=True),
}


def _ids(batch=2):
    return torch.randint(0, 96, (batch, 8), generator=torch.Generator().manual_seed(1))


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _base_weights(model):
    """module -> a copy of its quantised weight (its dequantised value for torchao tensors)."""
    return {m: (m.weight.dequantize() if quant.backend(m) == "torchao" else m.weight.detach()).clone()
            for m in model.modules() if quant.is_quantized(m)}


def _unchanged(before):
    for m, w in before.items():
        now = m.weight.dequantize() if quant.backend(m) == "torchao" else m.weight.detach()
        if not torch.equal(now, w):
            return False
    return True


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_on_quantized_base(saved_llama, kind, method):
    model = load_quantized(saved_llama, kind)
    peft_model = peftkit.get_peft_model(model, peftkit.LoraConfig(**METHODS[method]))
    layers = [layer for _, layer in peft_model.base_model.adapter_layers()]
    assert len(layers) == 4
    for layer in layers:
        base = layer.get_base_layer()
        assert quant.is_quantized(base), f"{type(base).__name__} lost its quantisation"
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
        # no full-precision copy of the weight is stored beside the quantised one
        full = base.in_features * base.out_features
        for name, t in layer.state_dict().items():
            if name.startswith("base_layer."):
                continue
            assert t.numel() < full, f"{name} is as large as the base weight: a stored dequantised copy?"
    # the delta is computed beside the quantised forward: layer(x) = base(x) + s * x A^T B^T (LoRA)
    _perturb(peft_model)
    layer = layers[0]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = layer(x)
        base_out = layer.base_layer(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        lora = layer.scaling["default"] * (x @ a.t() @ b.t())
        if method == "lora":
            want = base_out + lora
        else:  # DoRA: m / ||W + sBA|| * (x W^T + s x A^T B^T), W the dequantised weight, x W^T from the kernel
            w = quant.dequantize(layer.get_base_layer())
            factor = layer.lora_magnitude_vector["default"] / (w + layer.scaling["default"] * b @ a).norm(dim=1)
            bias = layer.get_base_layer().bias
            plain = base_out - (bias if bias is not None else 0)
            want = factor * (plain + lora) + (bias if bias is not None else 0)
    assert (got - want).abs().max().item() < 1e-4
    # (bitsandbytes repacks a 4-bit weight in place at its first no-grad eval forward on CPU: snapshot after it)
    before = _base_weights(peft_model)
    # training moves the adapter, lowers the loss, and leaves the quantised weights as they were
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(4)
    losses = []
    for _ in range(6):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert _unchanged(before), "training changed the quantised base weights"


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-8bit"])
@pytest.mark.parametrize("method", list(METHODS))
def test_merge_into_quantized_base_requantizes_and_reports(saved_llama, kind, method, caplog):
    model = peftkit.get_peft_model(load_quantized(saved_llama, kind), peftkit.LoraConfig(**METHODS[method]))
    _perturb(model)
    ids = _ids()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    with caplog.at_level(logging.WARNING, logger="peftkit.integrations.quantization"):
        merged_model = model.merge_and_unload()
    assert "re-quantisation error" in caplog.text
    quantized = [m for m in merged_model.modules() if quant.is_quantized(m)]
    assert len(quantized) == 14  # still quantised, every linear but the head
    with torch.no_grad():
        merged = merged_model(input_ids=ids).logits
    # the merge adds one more rounding of the weight: close to the unmerged output, not equal
    diff = (merged - unmerged).abs().max().item()
    assert 0 < diff < 0.25 * unmerged.abs().max().item(), diff


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-8bit"])
def test_merge_unmerge_records_error_per_layer(saved_llama, kind):
    model = peftkit.get_peft_model(load_quantized(saved_llama, kind), peftkit.LoraConfig(**METHODS["lora"]))
    _perturb(model)
    layer = next(layer for _, layer in model.base_model.adapter_layers())
    model.merge_adapter()
    assert layer.merged and layer.quantized_merge_error["default"] > 0
    w_merged = quant.dequantize(layer.get_base_layer())
    model.unmerge_adapter()
    assert not layer.merged
    assert quant.is_quantized(layer.get_base_layer())
    assert not torch.equal(quant.dequantize(layer.get_base_layer()), w_merged)


@pytest.mark.parametrize("kind", ["torchao-int8", "torchao-int4"])
def test_merge_into_torchao_base_is_refused_and_changes_nothing(saved_llama, kind):
    model = peftkit.get_peft_model(load_quantized(saved_llama, kind), peftkit.LoraConfig(**METHODS["lora"]))
    _perturb(model)
    before = _base_weights(model)
    with torch.no_grad():
        out = model(input_ids=_ids()).logits
    with pytest.raises(ValueError, match="torchao"):
        model.merge_and_unload()
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    assert _unchanged(before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, out)


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-8bit", "torchao-int8"])
def test_parity_with_peft_on_quantized_base(saved_llama, kind, tmp_path):
    peft = pytest.importorskip("peft")
    ids = _ids()
    ref = peft.get_peft_model(load_quantized(saved_llama, kind), peft.LoraConfig(**METHODS["lora"])).eval()
    _perturb(ref)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    ref.save_pretrained(str(tmp_path))
    ours = peftkit.PeftModel.from_pretrained(load_quantized(saved_llama, kind), tmp_path)
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4


def test_pissa_on_quantized_base_is_refused(saved_llama):
    model = load_quantized(saved_llama, "bnb-nf4")
    with pytest.raises(ValueError, match="PiSSA"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=QV, init_lora_weights="pissa"))
    assert not any(isinstance(m, peftkit.engine.layer.AdapterLayer) for m in model.modules())


def test_prepare_model_for_kbit_training(saved_llama):
    model = load_quantized(saved_llama, "bnb-nf4", dtype=torch.bfloat16)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)
    model = peftkit.prepare_model_for_kbit_training(model)  # reentrant checkpointing by default
    assert model.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in norms), "half-precision norms were not upcast"
    assert not any(p.requires_grad for p in model.parameters())
    peft_model = peftkit.get_peft_model(model, peftkit.LoraConfig(**METHODS["lora"]))
    peft_model.train()
    ids = _ids()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), "no gradient reached the adapters"


@pytest.mark.parametrize("kind", ["bnb-nf4", "torchao-int8"])
def test_methods_without_quantized_support_are_refused(saved_llama, kind):
    """The methods whose update transforms the dense weight refuse a quantised layer clearly, and leave the model as
    it was (the others: tests/test_quantized_methods.py)."""
    from peftkit.engine.registry import get_method, supported_methods

    model = load_quantized(saved_llama, kind)
    configs = {"OFT": peftkit.OFTConfig(r=0, oft_block_size=8, target_modules=QV),
               "BOFT": peftkit.BOFTConfig(boft_block_size=4, target_modules=QV),
               "HRA": peftkit.HRAConfig(r=4, target_modules=QV), "MISS": peftkit.MissConfig(r=4, target_modules=QV)}
    for method, config in configs.items():
        assert not get_method(method).supports_quantized_base
        with pytest.raises(ValueError, match="quantised layer"):
            peftkit.get_peft_model(model, config)
        assert not any(isinstance(m, peftkit.engine.layer.AdapterLayer) for m in model.modules()), method
    for method in ("LORA", "LOHA", "LOKR", "ADALORA", "IA3", "BITFIT"):
        assert get_method(method).supports_quantized_base and method in supported_methods()
