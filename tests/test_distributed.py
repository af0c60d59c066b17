"""DDP and FSDP2 (``fully_shard`` per decoder layer and the root) on CPU with gloo, 2 processes, tiny Llama.

One run of ``dist_worker.py`` (all cases, one spawn) writes the adapters trained each way; the tests compare them
with each other and with one process trained on the same global batch, load the folder that ``save_pretrained``
wrote under FSDP2 in this (single) process, and check an adapter loaded into an FSDP2-sharded model.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from models import MODELS

import peftkit

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_worker  # noqa: E402

CASES = ["lora", "dora", "loha", "lokr", "oft", "hra", "miss", "boft", "lora_mts", "seq_bn", "prompt", "ia3",
         "prefix", "p_tuning", "llama_adapter", "mam", "compacter", "ln_tuning", "adalora"]
try:
    import accelerate  # noqa: F401

    ACCELERATE = ["accelerate_ddp", "accelerate_fsdp2"]
except ImportError:  # pragma: no cover - accelerate is a test dependency
    ACCELERATE = []
TOL = 2e-6  # gradients are all-reduced in another order than one process sums them


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dist_worker.py"), str(out), ",".join(CASES + ACCELERATE)],
                          capture_output=True, text=True, timeout=600, env=env)
    errors = "".join(open(out / f).read() for f in os.listdir(out) if ".error_rank" in f)
    assert proc.returncode == 0, f"distributed worker failed:\n{errors or proc.stderr[-4000:]}"
    return out


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_close(got, want, tol, what):
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        diff = (got[k].float() - want[k].float()).abs().max().item()
        assert diff <= tol, f"{what}: {k} differs by {diff:.3g}"


def _trained_something(ref, case):
    base = peftkit.get_adapter_state_dict(dist_worker._build(case)[1].base_model, "default")
    same = [k for k in ref if k in base and ref[k].shape == base[k].shape]
    if not same:  # AdaLoRA saves the kept ranks only; its E starts at zero
        same = [k for k in ref if k.endswith("lora_E")]
        base = {k: torch.zeros_like(ref[k]) for k in same}
    assert same, "no adapter tensor to compare with its initial value"
    moved = max((ref[k] - base[k]).abs().max().item() for k in same)
    assert moved > 1e-4, "training did not change the adapter; the comparison would be vacuous"


@pytest.mark.parametrize("case", CASES)
def test_ddp_matches_single_process(runs, case):
    d = runs / case
    ref = _load(d / "ref.safetensors")
    _trained_something(ref, case)
    r0, r1 = _load(d / "ddp_rank0.safetensors"), _load(d / "ddp_rank1.safetensors")
    _assert_close(r0, r1, 0.0, "DDP ranks")
    _assert_close(r0, ref, TOL, "DDP vs one process")


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_matches_single_process(runs, case):
    d = runs / case
    ref = _load(d / "ref.safetensors")
    r0, r1 = _load(d / "fsdp_rank0.safetensors"), _load(d / "fsdp_rank1.safetensors")
    _assert_close(r0, r1, 0.0, "FSDP2 ranks (gathered)")
    _assert_close(r0, ref, TOL, "FSDP2 vs one process")


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_save_pretrained_gathers_and_writes_once(runs, case):
    d = runs / case
    saved = _load(d / "fsdp_saved" / "adapter_model.safetensors")
    gathered = _load(d / "fsdp_rank0.safetensors")
    _assert_close(saved, gathered, 0.0, "saved folder vs gathered adapter")
    assert all(".base_layer." not in k for k in saved), "base weights leaked into the adapter file"
    # is_main_process=False on rank 1 still gathered (no deadlock) and wrote nothing; rank 0 wrote the full adapter
    assert not (d / "per_rank1").exists(), "rank 1 wrote files"
    _assert_close(_load(d / "per_rank0" / "adapter_model.safetensors"), saved, 0.0, "is_main_process save")
    # the folder loads in one process with the trained weights
    spec = MODELS["llama"]
    base = spec.build()
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), d / "fsdp_saved")
    _assert_close(peftkit.get_adapter_state_dict(loaded.base_model, "default"), saved, 0.0, "loaded in one process")


@pytest.mark.parametrize("case", CASES)
def test_load_into_fsdp2_sharded_model(runs, case):
    d = runs / case
    saved = _load(d / "fsdp_saved" / "adapter_model.safetensors")
    single = peftkit.PeftModel.from_pretrained(MODELS["llama"].build(), d / "fsdp_saved").eval()
    with torch.no_grad():
        want = single(input_ids=dist_worker._batch()).logits
    # P-tuning's encoder is sharded and a checkpoint holds only its prompt: refused clearly, loaded before sharding
    for rank in (0, 1):
        assert (d / f"load_refused_rank{rank}.txt").exists() == (case == "p_tuning"), case
    for rank in (0, 1):
        out = _load(d / f"loaded_out_rank{rank}.safetensors")
        logits = out.pop("logits")
        _assert_close(out, saved, 0.0, f"adapter loaded into the sharded model (rank {rank})")
        diff = (logits - want).abs().max().item()
        assert diff <= 1e-5, f"sharded model with the loaded adapter: logits differ by {diff:.3g} (rank {rank})"


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_accelerate_prepare_and_save_pretrained(runs, mode):
    pytest.importorskip("accelerate")
    d = runs / f"accelerate_{mode}"
    kinds = [open(d / f"kind_rank{r}.txt").read().split() for r in (0, 1)]
    if mode == "fsdp2":  # accelerate's prepare() applied fully_shard: the parameters are sharded DTensors
        assert all(k[1].startswith("FSDP") and k[2] == "DTensor" for k in kinds), kinds
    else:
        assert all(k[0] == "DistributedType.MULTI_CPU" and k[1] == "DistributedDataParallel" for k in kinds), kinds
    ref = _load(runs / "lora" / "ref.safetensors")  # one process, same global batch, same steps
    gathered = _load(d / "gathered_rank0.safetensors")
    _assert_close(_load(d / "gathered_rank1.safetensors"), gathered, 0.0, "ranks")
    _assert_close(gathered, ref, TOL, "accelerate vs one process")
    assert sorted(os.listdir(d / "saved")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # adapter-only, with its model card
    saved = _load(d / "saved" / "adapter_model.safetensors")
    _assert_close(saved, gathered, 0.0, "adapter-only folder")
    loaded = peftkit.PeftModel.from_pretrained(MODELS["llama"].build(), d / "saved")
    _assert_close(peftkit.get_adapter_state_dict(loaded.base_model, "default"), saved, 0.0, "loaded in one process")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_accelerate_save_model_writes_adapter_only_folder(runs, mode):
    """``accelerator.save_model(model, dir)`` inside ``model.adapter_only_state_dict(save_directory=dir)``, on
    every rank: accelerate gathers (FSDP2: torch's get_model_state_dict) and writes only the adapter; the folder is
    peftkit's and loads with from_pretrained, with the outputs of the save_pretrained folder."""
    pytest.importorskip("accelerate")
    d = runs / f"accelerate_{mode}"
    assert sorted(os.listdir(d / "save_model")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = _load(d / "save_model" / "adapter_model.safetensors")
    _assert_close(saved, _load(d / "gathered_rank0.safetensors"), 0.0, "save_model folder vs gathered adapter")
    for rank in (0, 1):  # the whole state dict before and after the block, the adapter's 8 tensors inside it
        full, inside, after = map(int, open(d / f"state_dict_sizes_rank{rank}.txt").read().split())
        assert inside == 8 and full == after and full > inside, (full, inside, after)
    ids = dist_worker._batch()
    with torch.no_grad():
        got = peftkit.PeftModel.from_pretrained(MODELS["llama"].build(), d / "save_model")(input_ids=ids).logits
        want = peftkit.PeftModel.from_pretrained(MODELS["llama"].build(), d / "saved")(input_ids=ids).logits
    assert torch.equal(got, want)
