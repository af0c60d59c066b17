"""Gradient checkpointing with every registered method: the adapters get the same gradients with and without it,
for both torch variants (``use_reentrant=False`` and ``True``; the reentrant one with the frozen embedding's output
made to require grad, ``enable_input_require_grads``), and through ``transformers.Trainer``.

A method registered later is tried with ``config_cls(target_modules=["q_proj", "v_proj"])`` and skipped, with the
reason, if that does not build a model; give it an entry in ``CONFIGS`` when it needs other arguments.
"""

from __future__ import annotations

import copy

import pytest
import torch

from models import MODELS

import peftkit
from peftkit.engine.registry import get_method, supported_methods

SPEC = MODELS["llama"]
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base():
    return SPEC.build()


@pytest.fixture(scope="module")
def experts(base, tmp_path_factory):
    """Two LoRA experts for X-LoRA."""
    root = tmp_path_factory.mktemp("gc_experts")
    paths = {}
    for i in range(2):
        torch.manual_seed(20 + i)
        m = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=2, target_modules=QV, init_lora_weights=False))
        m.save_pretrained(root / str(i))
        paths[str(i)] = str(root / str(i))
    return paths


CONFIGS = {
    "LORA": lambda ex: peftkit.LoraConfig(r=4, target_modules=QV),
    "DORA": lambda ex: peftkit.LoraConfig(r=4, target_modules=QV, use_dora=True),
    "LOHA": lambda ex: peftkit.LoHaConfig(r=4, target_modules=QV),
    "LOKR": lambda ex: peftkit.LoKrConfig(r=4, target_modules=QV),
    "MISS": lambda ex: peftkit.MissConfig(r=4, target_modules=QV),
    "OFT": lambda ex: peftkit.OFTConfig(r=0, oft_block_size=8, target_modules=QV),
    "BOFT": lambda ex: peftkit.BOFTConfig(boft_block_size=4, target_modules=QV),
    "HRA": lambda ex: peftkit.HRAConfig(r=4, target_modules=QV),
    "ADALORA": lambda ex: peftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QV),
    "XLORA": lambda ex: peftkit.XLoraConfig(task_type="CAUSAL_LM", adapters=dict(ex)),
}
METHODS = sorted(set(supported_methods()) | {"DORA"})


def _config(method, experts):
    if method in CONFIGS:
        return CONFIGS[method](experts)
    try:
        return get_method(method).config_cls(target_modules=QV)
    except Exception as exc:  # pragma: no cover - depends on methods added later
        pytest.skip(f"{method}: no gradient-checkpointing config here and the default failed ({exc}); add one to CONFIGS")


def _model(base, method, experts):
    torch.manual_seed(3)
    try:
        model = peftkit.get_peft_model(copy.deepcopy(base), _config(method, experts))
    except Exception as exc:
        if method in CONFIGS:
            raise
        pytest.skip(f"{method}: default config does not apply to the tiny Llama ({exc}); add one to CONFIGS")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-trivial adapters, so that every parameter gets a non-zero gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def _grads(model):
    kw = SPEC.inputs(3)
    loss = SPEC.loss(model, kw)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", METHODS)
def test_same_gradients_with_checkpointing(base, experts, method, reentrant):
    model = _model(base, method, experts)
    checkpointed = copy.deepcopy(model)
    assert not checkpointed.get_base_model().get_input_embeddings().weight.requires_grad  # a frozen embedding
    want = _grads(model)
    assert want and any(g is not None for g in want.values())
    if method in CONFIGS:  # (a method added later may have parameters a forward does not use)
        assert all(g is not None for g in want.values())
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        checkpointed.enable_input_require_grads()
    assert checkpointed.get_base_model().is_gradient_checkpointing
    if method == "XLORA" and reentrant:  # the gate's scalings bypass the blocks' inputs: refused clearly
        with pytest.raises(ValueError, match="use_reentrant"):
            _grads(checkpointed)
        return
    got = _grads(checkpointed)
    assert sorted(got) == sorted(want)
    for n in want:
        if want[n] is None:
            assert got[n] is None, f"{n} got a gradient only under checkpointing"
            continue
        assert got[n] is not None, f"{n} got no gradient under checkpointing"
        diff = (got[n] - want[n]).abs().max().item()
        scale = max(1.0, want[n].abs().max().item())
        assert diff <= 1e-5 * scale, f"{n}: gradient differs by {diff:.3g} with checkpointing"


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", ["LORA", "DORA"])
def test_trainer_with_gradient_checkpointing(base, experts, method, reentrant, tmp_path):
    from transformers import Trainer, TrainingArguments

    ids = SPEC.inputs(4)["input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids]

    def train(gc):
        model = _model(base, method, experts)
        if gc and reentrant:
            model.enable_input_require_grads()
        args = TrainingArguments(output_dir=str(tmp_path / f"gc{gc}"), per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                 gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": reentrant},
                                 logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        Trainer(model=model, args=args, train_dataset=data).train()
        assert model.get_base_model().is_gradient_checkpointing == gc
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = train(False), train(True)
    start = {n: p.detach() for n, p in _model(base, method, experts).named_parameters() if p.requires_grad}
    assert any((plain[n] - start[n]).abs().max() > 1e-4 for n in plain), "Trainer did not train"
    for n in plain:
        diff = (checkpointed[n] - plain[n]).abs().max().item()
        assert diff <= 1e-5, f"{n}: Trainer with checkpointing trained differently ({diff:.3g})"
