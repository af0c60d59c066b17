"""``accelerator.save_model`` on a peftkit model, one process: adapter-only inside
``PeftModel.adapter_only_state_dict``, the whole state dict outside it (2-process FSDP2/DDP: test_distributed.py)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file

from models import MODELS

import peftkit

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402

FOLDER = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
CONFIGS = {
    "lora_mts": lambda: peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    # every tensor of these two is computed (the network's output prompt): accelerate has nothing to write
    "prefix_mlp": lambda: peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                                     encoder_hidden_size=16),
    "p_tuning": lambda: peftkit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "seq_bn": lambda: peftkit.SeqBnConfig(reduction_factor=4),
    "adalora": lambda: peftkit.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
}


def _model(case, seed=3):
    base = MODELS["llama"].build()
    torch.manual_seed(seed)
    model = peftkit.get_peft_model(copy.deepcopy(base), CONFIGS[case]())
    with torch.no_grad():  # move away from the initialisation (LoRA's B and AdaLoRA's E start at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return base, model.eval()


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_save_model_writes_peftkit_adapter_folder(tmp_path, case):
    base, model = _model(case)
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    full = model.state_dict()
    with model.adapter_only_state_dict(save_directory=tmp_path / "acc"):
        inside = model.state_dict()
        accelerator.save_model(prepared, tmp_path / "acc")
    assert list(model.state_dict()) == list(full)  # the whole state dict again after the block
    assert inside and set(inside) < set(full) or case in ("prefix_mlp", "p_tuning")  # computed prompts only
    assert all(torch.equal(v, full[k]) for k, v in inside.items())  # a subset of state_dict(), same keys and values
    assert not any(".base_layer." in k or k.endswith("embed_tokens.weight") for k in inside)
    assert sorted(os.listdir(tmp_path / "acc")) == FOLDER
    model.save_pretrained(tmp_path / "sp")
    got, want = load_file(tmp_path / "acc" / FOLDER[2]), load_file(tmp_path / "sp" / FOLDER[2])
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "acc")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_save_model_outside_the_block_is_accelerates_own(tmp_path):
    _, model = _model("lora_mts")
    accelerator = Accelerator(cpu=True)
    accelerator.save_model(model, tmp_path)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert sorted(load_file(tmp_path / "model.safetensors")) == sorted(model.state_dict())


def test_several_adapters_and_accelerate_load_checkpoint(tmp_path):
    from accelerate.utils import load_checkpoint_in_model

    base, model = _model("lora_mts")
    model.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["k_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".other." in n:
                p.add_(0.1)
    accelerator = Accelerator(cpu=True)
    with model.adapter_only_state_dict():  # no folder: only the state dict changes (accelerate's file stays)
        accelerator.save_model(model, tmp_path / "plain")
    saved = load_file(tmp_path / "plain" / "model.safetensors")
    assert any(".other." in k for k in saved) and any(".default." in k for k in saved)
    assert not any(".base_layer." in k for k in saved)
    _, again = _model("lora_mts", seed=9)
    again.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["k_proj"]))
    load_checkpoint_in_model(again, str(tmp_path / "plain"))  # accelerate's own loader takes the adapter back
    sd, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with model.adapter_only_state_dict(save_directory=tmp_path / "both"):
        accelerator.save_model(model, tmp_path / "both")
    assert sorted(os.listdir(tmp_path / "both")) == sorted(FOLDER + ["other"])
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "both")
    loaded.load_adapter(tmp_path / "both" / "other", "other")
    for name in ("default", "other"):
        got = peftkit.get_adapter_state_dict(loaded.base_model, name)
        want = peftkit.get_adapter_state_dict(model.base_model, name)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_block_errors_name_the_problem(tmp_path):
    _, model = _model("lora_mts")
    with pytest.raises(FileNotFoundError, match="accelerator.save_model"):
        with model.adapter_only_state_dict(save_directory=tmp_path):
            pass  # nothing saved into the folder
    assert len(model.state_dict()) > 9  # the hook is gone after the error
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        with model.adapter_only_state_dict(save_directory=tmp_path / "f"):
            pass


@pytest.mark.parametrize("case", ["p_tuning", "prefix_mlp"])
def test_load_adapter_into_existing_reparameterised_prompt(tmp_path, case):
    """A checkpoint holds the computed prompt; loading it into an adapter that still has its network loads it
    (before, the copy went into the network's output and changed nothing)."""
    _, trained = _model(case, seed=1)
    trained.save_pretrained(tmp_path)
    _, other = _model(case, seed=2)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(other(input_ids=ids).logits, trained(input_ids=ids).logits)
        other.load_adapter(tmp_path, "default")
        assert torch.equal(other.eval()(input_ids=ids).logits, trained(input_ids=ids).logits)
