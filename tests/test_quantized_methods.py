"""The methods beyond LoRA/DoRA on quantised bases, on CPU: bitsandbytes 4-bit NF4 (double quantisation) and 8-bit,
torchao int8 and int4 weight-only (the backends of tests/test_quantized.py, loaded through transformers).

The main check compares each adapted quantised model with a float "twin": the same architecture whose linear
weights are the dequantised quantised ones, carrying the same adapter weights. Layer-wrapping methods must route the
base call through the quantised kernel and add their delta beside it, so outputs and adapter gradients agree with
the twin's up to the kernel's own rounding (measured without adapters: the base gap). Every method is also checked
for a stored full-precision copy of a quantised weight (there must be none), for training without touching the
quantised weights, for merging (dequantise-merge-requantise with the error reported, or refusal, model unchanged),
and, where Hugging Face PEFT supports the same method on the same base, for output parity with it."""

from __future__ import annotations

import logging

import pytest
import torch

import peftkit
from peftkit.integrations import quantization as quant
from test_quantized import BACKENDS, _base_weights, _ids, _unchanged, load_quantized

QV = ["q_proj", "v_proj"]
# Methods that wrap the quantised linears themselves
LAYER_METHODS = {
    "loha": lambda: peftkit.LoHaConfig(r=4, alpha=8, target_modules=QV),
    "lokr": lambda: peftkit.LoKrConfig(r=4, alpha=8, target_modules=QV),
    "adalora": lambda: peftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QV),
    "ia3": lambda: peftkit.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "bitfit": lambda: peftkit.BitFitConfig(target_modules=["q_proj", "v_proj", "down_proj"]),
}
# Methods that add sub-layers or model-level tensors and leave the quantised linears as they are
OTHER_METHODS = {
    "seq_bn": lambda: peftkit.SeqBnConfig(reduction_factor=4),
    "double_seq_bn": lambda: peftkit.DoubleSeqBnConfig(reduction_factor=4),
    "par_bn": lambda: peftkit.ParBnConfig(reduction_factor=4),
    "compacter": lambda: peftkit.CompacterConfig(reduction_factor=8),
    "prompt_tuning": lambda: peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_tuning": lambda: peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "p_tuning": lambda: peftkit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
    "llama_adapter": lambda: peftkit.AdaptionPromptConfig(adapter_len=2, adapter_layers=1),
    "ln_tuning": lambda: peftkit.LNTuningConfig(),
    "mam": lambda: peftkit.MAMConfig(prefix_length=4, bottleneck_size=16),
    "unipelt": lambda: peftkit.UniPELTConfig(prefix_length=3, bottleneck_size=16, reduction_factor=4, r=2),
}
METHODS = {**LAYER_METHODS, **OTHER_METHODS}
DENSE_WEIGHT_METHODS = {  # their math multiplies the dense weight: refused on quantised layers
    "OFT": lambda: peftkit.OFTConfig(r=0, oft_block_size=8, target_modules=QV),
    "BOFT": lambda: peftkit.BOFTConfig(boft_block_size=4, target_modules=QV),
    "HRA": lambda: peftkit.HRAConfig(r=4, target_modules=QV),
    "MISS": lambda: peftkit.MissConfig(r=4, target_modules=QV),
}


@pytest.fixture(scope="module")
def saved_llama_bias(tmp_path_factory):
    """A tiny Llama with biases on its linears (BitFit needs them), hidden 64 (bitsandbytes' CPU 4-bit block)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("llama_bias")
    model.save_pretrained(path)
    return path


def float_twin(path, quantized):
    """The model at ``path`` in float32 with every quantised linear of ``quantized`` replaced by its dequantised
    weight (and the same bias): what the quantised model computes, up to the kernel's rounding."""
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if quant.is_quantized(module):
                target = twin.get_submodule(name)
                target.weight.copy_(quant.dequantize(module))
                if module.bias is not None:
                    target.bias.copy_(module.bias.float())
    return twin


def _noise(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _logits(model, ids):
    """The logits of the real tokens (prompt tuning prepends virtual ones). In train mode (no dropout anywhere
    here): in eval mode without grad, bitsandbytes repacks 4-bit weights in place for a bfloat16 CPU inference
    kernel, after which its training path fails on layers with a bias (a bitsandbytes limitation)."""
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()[:, -ids.shape[1]:]


def _adapted_pair(path, kind, method):
    """(quantised base, adapted quantised model, adapted float twin with the same adapter weights, base twin)."""
    base = load_quantized(path, kind)
    ids = _ids()
    twin_base = float_twin(path, base)
    base_logits = _logits(twin_base, ids)
    base_gap = (_logits(base, ids) - base_logits).abs().max().item()
    twin = float_twin(path, base)
    ours = peftkit.get_peft_model(base, METHODS[method]())
    _noise(ours)
    twin = peftkit.get_peft_model(twin, METHODS[method]())
    trained = {n: p.detach() for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and all(n in dict(twin.named_parameters()) for n in trained)
    twin.load_state_dict(trained, strict=False)
    return ours, twin, base_gap, base_logits


def _quantized_layers(model):
    """The quantised linears themselves (not the adapter layers around them, which show their weight)."""
    return [m for m in model.modules()
            if quant.is_quantized(m) and not isinstance(m, peftkit.engine.layer.AdapterLayer)]


def _stored_copies(model):
    """Float tensors (parameters, buffers, plain attributes of any module) outside the quantised layers whose
    values are a quantised layer's dequantised weight (or its transpose): a stored full-precision copy."""
    quantized = _quantized_layers(model)
    dense = {}
    for m in quantized:
        w = quant.dequantize(m)
        dense.setdefault(w.numel(), []).append(w)
    inside = {id(t) for m in quantized for t in list(m.parameters()) + list(m.buffers())}
    found = []
    for name, module in model.named_modules():
        if module in quantized:
            continue
        tensors = dict(module._parameters) | dict(module._buffers)
        tensors |= {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
        for k, t in tensors.items():
            if t is None or id(t) in inside or not t.dtype.is_floating_point or t.numel() not in dense:
                continue
            t = t.detach().float()
            for w in dense[t.numel()]:
                if any(torch.allclose(t.reshape(v.shape), v, atol=1e-3) for v in (w, w.t())):
                    found.append(f"{name}.{k} {tuple(t.shape)}")
    return found


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_quantized_base_matches_dequantized_twin(saved_llama_bias, kind, method):
    ours, twin, base_gap, base_logits = _adapted_pair(saved_llama_bias, kind, method)
    wrapped = [m for m in ours.modules() if isinstance(m, peftkit.engine.layer.AdapterLayer)]
    if method in LAYER_METHODS:  # the base stays quantised inside the adapter layer
        bases = [m.get_base_layer() for m in wrapped if hasattr(m, "get_base_layer")]
        assert bases and all(quant.is_quantized(b) for b in bases), [type(b).__name__ for b in bases]
    assert len(_quantized_layers(ours)) == 14, "a quantised linear was replaced"
    ids = _ids()
    got, want = _logits(ours, ids), _logits(twin, ids)
    moved = (want - base_logits).abs().max().item()
    tol = max(4 * base_gap, 2e-5)
    assert moved > 20 * tol, f"the adapter barely changes the output ({moved:.2e}): the comparison would be vacuous"
    assert (got - want).abs().max().item() < tol, ((got - want).abs().max().item(), base_gap)
    # the same gradients reach the adapter (the delta is computed beside the quantised kernel, in float)
    ours.train(), twin.train()
    for model in (ours, twin):
        model(input_ids=ids, labels=ids).loss.backward()
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    grads_twin = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_twin.keys() and grads_ours
    for n, g in grads_ours.items():
        assert g is not None, n
        scale = grads_twin[n].abs().max().item() + 1e-3
        assert (g - grads_twin[n]).abs().max().item() < max(50 * base_gap, 1e-3) * scale, n
    assert not _stored_copies(ours), _stored_copies(ours)


@pytest.mark.parametrize("kind", ["bnb-nf4", "torchao-int8"])
def test_stored_copy_detector_finds_a_dequantized_copy(saved_llama_bias, kind):
    """The no-copy assertions above are not vacuous: a dequantised weight kept on a module is found."""
    model = peftkit.get_peft_model(load_quantized(saved_llama_bias, kind), METHODS["loha"]())
    assert not _stored_copies(model)
    layer = next(layer for _, layer in model.base_model.adapter_layers())
    layer.register_buffer("cached_weight", quant.dequantize(layer.get_base_layer()).t().contiguous())
    assert _stored_copies(model) == [f"{next(n for n, m in model.named_modules() if m is layer)}.cached_weight "
                                     f"{tuple(layer.cached_weight.shape)}"]


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("method", ["loha", "lokr", "adalora", "ia3", "bitfit", "seq_bn", "prefix_tuning", "unipelt"])
def test_training_leaves_the_quantized_weights_alone(saved_llama_bias, kind, method):
    model = load_quantized(saved_llama_bias, kind)
    ids = _ids(4)
    before = _base_weights(model)
    model = peftkit.get_peft_model(model, METHODS[method]())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert _unchanged(before), "training changed the quantised base weights"
    assert not _stored_copies(model), _stored_copies(model)


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-8bit"])
@pytest.mark.parametrize("method", ["loha", "lokr", "adalora", "ia3"])
def test_merge_into_bnb_base_requantizes_and_reports(saved_llama_bias, kind, method, caplog):
    model = load_quantized(saved_llama_bias, kind)
    model = peftkit.get_peft_model(model, METHODS[method]())
    _noise(model)
    ids = _ids()
    unmerged = _logits(model, ids)
    layers = [layer for _, layer in model.base_model.adapter_layers()]
    with caplog.at_level(logging.WARNING, logger="peftkit.integrations.quantization"):
        model.merge_adapter()
    assert "re-quantisation error" in caplog.text
    assert all(layer.merged and layer.quantized_merge_error["default"] > 0 for layer in layers)
    assert all(quant.is_quantized(layer.get_base_layer()) for layer in layers)
    merged = _logits(model, ids)
    diff = (merged - unmerged).abs().max().item()
    assert 0 < diff < 0.25 * unmerged.abs().max().item(), diff  # one more rounding of the weights, no more
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers)
    again = _logits(model, ids)
    assert (again - unmerged).abs().max().item() < 0.25 * unmerged.abs().max().item()
    final = model.merge_and_unload()
    assert len(_quantized_layers(final)) == 14


@pytest.mark.parametrize("kind", BACKENDS)
def test_bitfit_merge_into_quantized_base_is_exact(saved_llama_bias, kind):
    """BitFit's merge is an addition to the (float) bias: nothing is re-quantised, so merged = unmerged."""
    model = peftkit.get_peft_model(load_quantized(saved_llama_bias, kind), METHODS["bitfit"]())
    _noise(model)
    ids = _ids()
    unmerged = _logits(model, ids)
    before = _base_weights(model)
    merged_model = model.merge_and_unload()
    assert len(_quantized_layers(merged_model)) == 14
    assert (_logits(merged_model, ids) - unmerged).abs().max().item() < 1e-5
    assert _unchanged(before)


@pytest.mark.parametrize("kind", ["torchao-int8", "torchao-int4"])
@pytest.mark.parametrize("method", ["loha", "lokr", "adalora", "ia3"])
def test_merge_into_torchao_base_is_refused_and_changes_nothing(saved_llama_bias, kind, method):
    model = peftkit.get_peft_model(load_quantized(saved_llama_bias, kind), METHODS[method]())
    _noise(model)
    before = _base_weights(model)
    ids = _ids()
    out = _logits(model, ids)
    with pytest.raises(ValueError, match="torchao"):
        model.merge_and_unload()
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    assert _unchanged(before)
    assert torch.equal(_logits(model, ids), out)


def test_ia3_with_a_zero_scale_refuses_to_merge_into_a_quantized_base(saved_llama_bias):
    model = peftkit.get_peft_model(load_quantized(saved_llama_bias, "bnb-nf4"), METHODS["ia3"]())
    layer = next(layer for _, layer in model.base_model.adapter_layers())
    with torch.no_grad():
        layer.ia3_l["default"][0] = 0.0
    before = _base_weights(model)
    with pytest.raises(ValueError, match="zero"):
        model.merge_adapter()
    assert _unchanged(before) and not any(la.merged for _, la in model.base_model.adapter_layers())


@pytest.mark.parametrize("kind", ["bnb-nf4", "torchao-int8"])
@pytest.mark.parametrize("method", list(DENSE_WEIGHT_METHODS))
def test_dense_weight_methods_are_refused_naming_method_and_class(saved_llama_bias, kind, method):
    model = load_quantized(saved_llama_bias, kind)
    cls = "Linear4bit" if kind == "bnb-nf4" else "Linear"
    with pytest.raises(ValueError, match=rf"{method} cannot adapt model\.layers\.0\.self_attn\.q_proj: it is a "
                                         rf"quantised layer \({cls}"):
        peftkit.get_peft_model(model, DENSE_WEIGHT_METHODS[method]())
    assert not any(isinstance(m, peftkit.engine.layer.AdapterLayer) for m in model.modules())
    assert len(_quantized_layers(model)) == 14


PEFT_SAME = {  # methods Hugging Face PEFT supports on these bases, with the same meaning
    "adalora": lambda peft: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QV),
    "ia3": lambda peft: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt_tuning": lambda peft: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_tuning": lambda peft: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-8bit", "torchao-int8"])
@pytest.mark.parametrize("method", list(PEFT_SAME))
def test_parity_with_peft_on_quantized_base(saved_llama_bias, kind, method, tmp_path):
    peft = pytest.importorskip("peft")
    ids = _ids()
    ref = peft.get_peft_model(load_quantized(saved_llama_bias, kind), PEFT_SAME[method](peft)).eval()
    _noise(ref)
    want = _logits(ref, ids)
    ref.save_pretrained(str(tmp_path))
    ours = peftkit.PeftModel.from_pretrained(load_quantized(saved_llama_bias, kind), tmp_path)
    assert len(_quantized_layers(ours)) == 14
    assert (_logits(ours, ids) - want).abs().max().item() < 1e-4


# ------------------------------------------------------------------ the chunked 4-bit base (QLoRA peak memory)
def _linear4bit(out_f, in_f, bias, compute_dtype=torch.float32, seed=0):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)._quantize("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.train()


@pytest.mark.parametrize("shape, bias, rows", [((200, 128), True, 24), ((96, 64), False, 1000), ((128, 192), True, 1)])
def test_chunked_4bit_base_equals_bitsandbytes(shape, bias, rows, monkeypatch):
    """base_forward computes the 4-bit layer from its quantised bytes a few rows at a time: the same output as
    bitsandbytes' own matmul and the same input gradient (a shorter last chunk; one chunk; one row per chunk)."""
    layer = _linear4bit(*shape, bias)
    monkeypatch.setattr(quant, "CHUNK_BYTES", rows * shape[1] * 4)
    x = torch.randn(3, 5, shape[1], requires_grad=True)
    assert quant._chunkable(layer, x) is not None
    g = torch.randn(3, 5, shape[0])
    want = layer(x)
    (want_gx,) = torch.autograd.grad(want, x, g)
    got = quant.base_forward(layer, x)
    assert "Linear4bitChunked" in type(got.grad_fn).__name__
    (got_gx,) = torch.autograd.grad(got, x, g)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() < 1e-5
    assert (got_gx - want_gx).abs().max().item() < 1e-5


def test_chunked_4bit_base_never_holds_the_dequantized_weight(monkeypatch):
    """The largest allocation of a forward + backward through base_forward is one chunk, not the (out, in) float
    weight bitsandbytes' own matmul dequantises (in both passes)."""
    from torch.profiler import ProfilerActivity, profile

    layer = _linear4bit(512, 256, bias=False)
    monkeypatch.setattr(quant, "CHUNK_BYTES", 64 * 256 * 4)
    x = torch.randn(4, 256, requires_grad=True)
    full = 512 * 256 * 4

    def largest(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(x).sum().backward()
        return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")

    assert largest(layer) >= full  # bitsandbytes: the whole dequantised weight at once
    assert largest(lambda t: quant.base_forward(layer, t)) <= 64 * 256 * 4


def test_chunked_4bit_base_is_left_to_bitsandbytes_where_it_must_be():
    layer = _linear4bit(64, 64, bias=False)
    x = torch.randn(2, 64)
    assert quant._chunkable(layer, x) is not None
    assert quant._chunkable(_linear4bit(64, 96, bias=False), x[:, :1].expand(2, 96)) is None  # blocks span rows
    handle = layer.register_forward_hook(lambda *a: None)  # hooks (accelerate, user code) must run
    assert quant._chunkable(layer, x) is None
    handle.remove()
    layer.eval()
    with torch.no_grad():  # inference: bitsandbytes' own kernels
        assert quant._chunkable(layer, x) is None
        layer(x)
    layer.train()
    assert quant._chunkable(layer, x) is None  # repacked for bitsandbytes' CPU inference kernel: its own path


def test_chunked_4bit_base_in_bfloat16_compute(monkeypatch):
    layer = _linear4bit(128, 64, bias=True, compute_dtype=torch.bfloat16)
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    monkeypatch.setattr(quant, "CHUNK_BYTES", 32 * 64 * 2)
    x = torch.randn(6, 64, requires_grad=True)
    want, got = layer(x), quant.base_forward(layer, x)
    assert got.dtype == want.dtype == torch.float32
    assert (got - want).abs().max().item() < 2e-2 * want.abs().max().item()
