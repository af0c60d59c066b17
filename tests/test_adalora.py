"""AdaLoRA: the shared contract, PEFT's ViT-base parameter count, config errors, the budget schedule, allocator
parity with Hugging Face PEFT step by step, and rank shrinking under both automatic paths (optimiser hook and
Trainer callback) with pruned checkpoints that reload at their kept ranks in both libraries."""

import copy
import json
import logging

import pytest
import torch
from contract import Case, contract_tests
from models import MODELS, VIT_QV

import peftkit
from peftkit import AdaLoraCallback, AdaLoraConfig, attach_to_optimizer
from peftkit.methods.lora.adalora_budget import budget_schedule
from peftkit.engine.save_load import get_adapter_state_dict, set_adapter_state_dict

QV = ["q_proj", "v_proj"]


def _perturb(model):
    """Noise on A, E and B large enough to move the output: the SVD form multiplies three small factors."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_" in name and ".modules_to_save." not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.4)


def ada_case(id, model, **kwargs):
    kwargs.setdefault("total_step", 20)
    kwargs.setdefault("init_r", 4)
    kwargs.setdefault("target_r", 2)
    return Case(id, model, lambda: AdaLoraConfig(**kwargs), ref=lambda peft: peft.AdaLoraConfig(**kwargs),
                perturb=_perturb)


CASES = [
    ada_case("adalora-llama-qv", "llama", lora_alpha=8, target_modules=QV),
    ada_case("adalora-llama-non-square", "llama", target_modules=["o_proj", "down_proj"]),
    ada_case("adalora-bert-cls", "bert", target_modules=["query", "value"], modules_to_save=["classifier"]),
    ada_case("adalora-vit-cls", "vit", lora_alpha=16, target_modules=VIT_QV, modules_to_save=["classifier"]),
    ada_case("adalora-gpt2-conv1d", "gpt2", target_modules=["c_attn"], fan_in_fan_out=True),
    ada_case("adalora-conv2d", "cnn", init_r=3, target_r=1, target_modules=["conv0", "conv1", "lin"]),
]

globals().update(contract_tests(CASES))


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _nonzero_ranks(model, adapter="default"):
    """Live triplets (non-zero E entries) per adapted matrix."""
    return {k: int((e != 0).sum()) for k, (_, e, _) in model.base_model.triplets(adapter).items()}


# ----------------------------------------------------------------------------------------------- structure
def test_vit_base_trainable_parameter_count_matches_peft_guide():
    """PEFT's image-classification guide prints 520,325 for ViT-base, 101 labels, init_r=12, q/v + classifier."""
    from transformers import ViTConfig, ViTForImageClassification

    with torch.device("meta"):
        base = ViTForImageClassification(ViTConfig(num_labels=101))
    config = AdaLoraConfig(init_r=12, target_modules=VIT_QV, modules_to_save=["classifier"], total_step=1000,
                           tinit=200, tfinal=500, deltaT=10)
    model = peftkit.get_peft_model(base, config)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 520_325
    # 24 matrices of (12 x 768) + (12 x 1) + (768 x 12), plus the classifier copy (768 * 101 + 101).
    assert trainable == 24 * (12 * 768 + 12 + 768 * 12) + 768 * 101 + 101


def test_layer_shapes_init_and_scaling():
    base = MODELS["llama"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), AdaLoraConfig(init_r=6, target_r=3, lora_alpha=12,
                                                                      total_step=10, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, e, b = layer.triplet("default")
    assert a.shape == (6, 32) and e.shape == (6, 1) and b.shape == (32, 6)
    assert torch.equal(e, torch.zeros_like(e))  # identity at init
    assert 0.01 < a.std().item() < 0.03 and 0.01 < b.std().item() < 0.03  # normal(0, 0.02) as in PEFT
    assert layer.ranknum["default"].item() == 6.0 and not layer.ranknum["default"].requires_grad
    assert layer.scaling["default"] == 12
    with torch.no_grad():
        e.normal_()
    expected = b @ (a * e) * 12 / (6 + 1e-5)
    assert torch.allclose(layer.delta_weight("default"), expected, atol=1e-6)
    # ranknum is not a checkpoint tensor (PEFT recomputes it)
    assert not any("ranknum" in k for k in get_adapter_state_dict(model.base_model, "default"))


def test_unsupported_targets_are_reported():
    base = MODELS["llama"].build()
    with pytest.raises(ValueError, match="cannot adapt any"):
        peftkit.get_peft_model(base, AdaLoraConfig(total_step=10, target_modules=["embed_tokens"]))


# --------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "needs total_step"),
        (dict(total_step=0), "needs total_step"),
        (dict(total_step=10, tinit=5, tfinal=5), "must be smaller than total_step"),
        (dict(total_step=10, tinit=8, tfinal=3), "must be smaller than total_step"),
        (dict(total_step=10, init_r=4, target_r=6), "larger than init_r"),
        (dict(total_step=10, deltaT=0), "deltaT"),
        (dict(total_step=10, beta1=1.0), "beta1"),
        (dict(total_step=10, beta2=0.0), "beta2"),
        (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight"),
        (dict(total_step=10, use_dora=True), "DoRA"),
        (dict(total_step=10, init_lora_weights="gaussian"), "init_lora_weights"),
        (dict(total_step=10, rank_pattern={"q_proj": 4}), "keep-mask"),
        (dict(total_step=10, bias="some"), "bias"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(target_modules=QV, **kwargs)


def test_config_reads_peft_json_without_warnings(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    peft.AdaLoraConfig(init_r=6, target_r=3, total_step=50, tinit=5, tfinal=10, deltaT=2, beta1=0.8, beta2=0.9,
                       orth_reg_weight=0.2, lora_alpha=16, target_modules=QV).save_pretrained(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        config = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, AdaLoraConfig) and not caplog.records
    assert (config.init_r, config.target_r, config.total_step, config.tinit, config.tfinal, config.deltaT) == (
        6, 3, 50, 5, 10, 2)
    assert (config.beta1, config.beta2, config.orth_reg_weight, config.lora_alpha) == (0.8, 0.9, 0.2, 16)


def test_second_trainable_adapter_is_refused():
    model = peftkit.get_peft_model(MODELS["llama"].build(), AdaLoraConfig(total_step=10, target_modules=QV))
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("other", AdaLoraConfig(total_step=10, target_modules=QV))
    model.add_adapter("frozen", AdaLoraConfig(total_step=10, target_modules=QV, inference_mode=True))
    assert model.base_model.trainable_adapter_name == "default"


# --------------------------------------------------------------------------------------------------- schedule
def test_budget_schedule_three_phases():
    kw = dict(init_budget=48, target_budget=16, tinit=10, tfinal=20, total_step=100, deltaT=5)
    assert budget_schedule(0, **kw) == (48, False)
    assert budget_schedule(10, **kw) == (48, False)  # warm-up, inclusive
    assert budget_schedule(15, **kw) == (int(32 * (1 - 5 / 70) ** 3 + 16), True)
    assert budget_schedule(16, **kw)[1] is False  # masks only every deltaT steps
    budgets = [budget_schedule(s, **kw)[0] for s in range(11, 81)]
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 16  # cubic decrease to the target
    assert budget_schedule(81, **kw) == (16, True)  # final phase


def test_update_and_allocate_needs_gradients_and_a_trainable_adapter(tmp_path):
    base = MODELS["llama"].build()
    model = peftkit.get_peft_model(copy.deepcopy(base), AdaLoraConfig(total_step=10, target_modules=QV))
    with pytest.raises(RuntimeError, match="after loss.backward"):
        model.base_model.update_and_allocate(0)
    model.save_pretrained(tmp_path)
    frozen = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with pytest.raises(ValueError, match="no trainable adapter"):
        frozen.base_model.update_and_allocate(0)
    opt = torch.optim.SGD(_trainable(frozen) or [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="no trainable adapter"):
        attach_to_optimizer(frozen, opt)
    wrong = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="does not hold"):
        attach_to_optimizer(model, wrong)


# ------------------------------------------------------------------------------------------ orthogonal penalty
def test_orthogonal_penalty_is_added_to_the_loss():
    spec = MODELS["llama"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), AdaLoraConfig(total_step=10, orth_reg_weight=0.3,
                                                                      target_modules=QV))
    kw = spec.inputs(2)
    reg = model.base_model.orthogonal_regularization()
    terms = []
    for a, _, b in model.base_model.triplets("default").values():
        terms += [torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0])),
                  torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1]))]
    assert torch.allclose(reg, torch.stack(terms).mean())
    base_loss = base(**kw, labels=kw["input_ids"]).loss  # E = 0: the adapter does not change the output
    assert torch.allclose(model(**kw, labels=kw["input_ids"]).loss, base_loss + 0.3 * reg)
    assert model(**kw).loss is None
    with model.disable_adapter():
        assert torch.allclose(model(**kw, labels=kw["input_ids"]).loss, base_loss)


# ------------------------------------------------------------------------------------ parity with PEFT's loop
def _peft_and_ours(model_name, **kwargs):
    peft = pytest.importorskip("peft")
    base = MODELS[model_name].build()
    torch.manual_seed(11)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kwargs))
    ours = peftkit.get_peft_model(copy.deepcopy(base), AdaLoraConfig(**kwargs))
    set_adapter_state_dict(ours.base_model, peft.get_peft_model_state_dict(ref), "default")
    return peft, base, ref, ours


def _train_step(model, spec, kw, opt, step, update):
    loss = spec.loss(model, kw)
    loss.backward()
    opt.step()
    if update:
        model.base_model.update_and_allocate(step)
    opt.zero_grad()
    return loss.item()


# task_type matters for PEFT: only its task-specific models route forward through AdaLoraModel (the penalty).
ALLOC = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=9, beta1=0.8, beta2=0.9,
             target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")


def test_allocator_matches_peft_step_by_step(tmp_path):
    """Same weights, data and optimiser: losses (with the penalty), masks and rank patterns equal PEFT's."""
    spec = MODELS["llama"]
    peft, base, ref, ours = _peft_and_ours("llama", **ALLOC)
    ref.train(); ours.train()
    opt_ref = torch.optim.SGD(_trainable(ref), lr=0.5)
    opt_ours = torch.optim.SGD(_trainable(ours), lr=0.5)
    for step in range(ALLOC["total_step"]):
        ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(step))
        kw = {"input_ids": ids}  # a new batch per step: the importance averages see varying gradients
        loss_ref = _train_step(ref, spec, kw, opt_ref, step, True)
        loss_ours = _train_step(ours, spec, kw, opt_ours, step, True)
        assert loss_ours == pytest.approx(loss_ref, rel=1e-5, abs=1e-6), step
        ref_pattern = ref.peft_config["default"].rank_pattern
        if ref_pattern:
            ref_masks = {k.replace(".default", ""): v for k, v in ref_pattern.items()}
            assert ours.peft_config["default"].rank_pattern == ref_masks, step
    ref_state = peft.get_peft_model_state_dict(ref)
    ours_state = get_adapter_state_dict(ours.base_model, "default")
    assert ref_state.keys() == ours_state.keys()
    for k in ref_state:
        assert torch.allclose(ref_state[k], ours_state[k], atol=1e-5), k
    final = ours.peft_config["default"].rank_pattern
    assert sum(sum(m) for m in final.values()) == 2 * 6  # target_r * matrices
    assert len({sum(m) for m in final.values()}) > 1  # re-allocated across matrices, not a uniform cut


def test_peft_trained_pruned_checkpoint_loads_at_its_ranks(tmp_path):
    spec = MODELS["llama"]
    peft, base, ref, _ = _peft_and_ours("llama", **ALLOC)
    ref.train()
    opt = torch.optim.SGD(_trainable(ref), lr=0.5)
    for step in range(ALLOC["total_step"]):
        _train_step(ref, spec, spec.inputs(4), opt, step, True)
    ref.eval()
    expected = spec.output(ref(**spec.inputs(3))).detach()
    ref.save_pretrained(str(tmp_path))
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    for key, (a, e, b) in ours.base_model.triplets("default").items():
        assert a.shape[0] == e.shape[0] == b.shape[1] == sum(pattern[key])
    with torch.no_grad():
        got = spec.output(ours(**spec.inputs(3)))
    assert torch.allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------------ automatic paths: ranks shrink
def test_optimizer_hook_shrinks_ranks_and_checkpoint_reloads_pruned(tmp_path):
    spec = MODELS["llama"]
    base = spec.build()
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=3, tfinal=4, deltaT=1, total_step=20,
                           target_modules=["q_proj", "v_proj", "o_proj"])
    model = peftkit.get_peft_model(copy.deepcopy(base), config)
    model.train()
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    hook = attach_to_optimizer(model, opt)
    allocator = model.base_model.rankallocator
    assert (allocator.init_budget, allocator.target_budget) == (24, 12)
    live = []
    kw = spec.inputs(4)
    for step in range(20):
        opt.zero_grad()
        spec.loss(model, kw).backward()
        opt.step()  # the hook runs update_and_allocate(step) here
        live.append(sum(_nonzero_ranks(model).values()))
        budget, _ = budget_schedule(step, init_budget=24, target_budget=12, tinit=3, tfinal=4, total_step=20,
                                    deltaT=1)
        assert live[-1] <= budget, (step, live)
    hook.remove()
    assert hook.global_step == 20
    assert live[3] == 24 and live[-1] == 12 and live[8] < 24  # warm-up at full rank, then down to the target
    pattern = model.peft_config["default"].rank_pattern
    ranks = _nonzero_ranks(model)
    assert {k: sum(m) for k, m in pattern.items()} == ranks
    assert sum(ranks.values()) == 12

    # the checkpoint holds only the kept triplets and reloads at those ranks with the same outputs
    model.eval()
    with torch.no_grad():
        expected = spec.output(model(**spec.inputs(3)))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert saved == pattern
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for key, (a, e, b) in loaded.base_model.triplets("default").items():
        assert a.shape[0] == e.shape[0] == b.shape[1] == ranks[key]
        assert loaded.base_model.model.get_submodule(key[: -len(".lora_E")]).ranknum["default"].item() == 4
    with torch.no_grad():
        assert torch.allclose(spec.output(loaded(**spec.inputs(3))), expected, atol=1e-6)
    # ... and so does Hugging Face PEFT
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(spec.output(theirs(**spec.inputs(3))), expected, atol=1e-6)
    # shrinking the live model to the kept ranks leaves its outputs unchanged
    with torch.no_grad():
        before = spec.output(model(**spec.inputs(3)))
    model.base_model.resize_modules_by_rank_pattern(pattern, "default")
    assert {k: e.shape[0] for k, (_, e, _) in model.base_model.triplets("default").items()} == ranks
    with torch.no_grad():
        assert torch.allclose(spec.output(model(**spec.inputs(3))), before, atol=1e-6)

    # a detached hook no longer allocates
    opt.step()
    assert hook.global_step == 20

    # resuming from the pruned checkpoint trains at the kept ranks and saves them again
    resumed = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    resumed.train()
    opt = torch.optim.AdamW(_trainable(resumed), lr=1e-2)
    attach_to_optimizer(resumed, opt, start_step=20)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = spec.loss(resumed, kw)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    resumed.eval()
    with torch.no_grad():
        expected = spec.output(resumed(**spec.inputs(3)))
    resumed.save_pretrained(tmp_path / "resumed")
    again = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "resumed")
    assert {k: e.shape[0] for k, (_, e, _) in again.base_model.triplets("default").items()} == ranks
    with torch.no_grad():
        assert torch.equal(spec.output(again(**spec.inputs(3))), expected)


def test_trainer_callback_shrinks_ranks(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = MODELS["bert"]
    base = spec.build()
    config = AdaLoraConfig(init_r=4, target_r=1, tinit=1, tfinal=2, deltaT=1, total_step=8,
                           target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = peftkit.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 96, (8,), generator=g), "labels": i % 3} for i in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback()])
    trainer.train()
    ranks = _nonzero_ranks(model)
    assert sum(ranks.values()) == 1 * 4  # target_r * 4 matrices, from 16
    assert {k: sum(m) for k, m in model.peft_config["default"].rank_pattern.items()} == ranks
    model.save_pretrained(tmp_path / "adapter")
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    assert {k: e.shape[0] for k, (_, e, _) in loaded.base_model.triplets("default").items()} == ranks


def test_callback_warns_when_the_run_is_shorter_than_the_schedule(caplog):
    model = peftkit.get_peft_model(MODELS["llama"].build(), AdaLoraConfig(total_step=100, tfinal=10,
                                                                          target_modules=QV))

    class State:
        max_steps = 50

    with caplog.at_level(logging.WARNING):
        AdaLoraCallback().on_train_begin(None, State(), None, model=model)
    assert "will not reach target_r" in caplog.text
    caplog.clear()
    State.max_steps = 100
    with caplog.at_level(logging.WARNING):
        AdaLoraCallback(model).on_train_begin(None, State(), None)
    assert not caplog.records
    assert AdaLoraCallback().on_log(None, None, None) is None  # other Trainer events are no-ops


# ---------------------------------------------------------------------------------------------- multi-adapter
def test_mixed_batch_uses_each_rows_adapter():
    spec = MODELS["llama"]
    base = spec.build()
    model = peftkit.get_peft_model(copy.deepcopy(base), AdaLoraConfig(total_step=10, target_modules=QV)).eval()
    model.add_adapter("other", AdaLoraConfig(total_step=10, target_modules=QV, inference_mode=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.1)
    kw = spec.inputs(4)
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        mixed = spec.output(model(**kw, adapter_names=names))
        for i, name in enumerate(names):
            row = {"input_ids": kw["input_ids"][i:i + 1]}
            if name == "__base__":
                with model.disable_adapter():
                    want = spec.output(model(**row))
            else:
                model.set_adapter(name)
                want = spec.output(model(**row))
            assert torch.allclose(mixed[i:i + 1], want, atol=1e-5), name


@pytest.mark.parametrize("model_key,targets", [("llama", QV), ("gpt2", ["c_attn", "c_fc"])])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_fused_forward_equals_plain_autograd(model_key, targets, bias):
    """SVDLinear routes through the fused LoRA node (A' = A * E * scaling / ranknum); outputs and every gradient
    (A, E, B, trainable bias, the embeddings' input gradient) equal the plain per-adapter composition."""
    from peftkit.engine.layer import AdapterLayer
    from peftkit.methods.lora.adalora import SVDLinear

    torch.manual_seed(0)
    spec = MODELS[model_key]
    model = peftkit.get_peft_model(spec.build(), AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                                      target_modules=targets, bias=bias))
    _perturb(model)
    inputs = spec.inputs(2)

    from peftkit.methods.lora import lora_ops

    calls = []
    real_node = lora_ops.lora_linear

    def counting_node(*a, **k):
        calls.append(1)
        return real_node(*a, **k)

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        saved = SVDLinear.forward_adapters
        if not fused:
            SVDLinear.forward_adapters = AdapterLayer.forward_adapters
        lora_ops.lora_linear = counting_node
        try:
            out = spec.output(model(**inputs))
        finally:
            SVDLinear.forward_adapters = saved
            lora_ops.lora_linear = real_node
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_out, fused_grads = run(True)
    n_adapted = sum(isinstance(m, SVDLinear) for m in model.modules())
    assert len(calls) == n_adapted > 0  # every adapted layer took the fused node
    ref_out, ref_grads = run(False)
    assert len(calls) == n_adapted
    torch.testing.assert_close(fused_out, ref_out, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == ref_grads.keys() and any(".lora_E." in n for n in fused_grads)
    for n in ref_grads:
        torch.testing.assert_close(fused_grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
