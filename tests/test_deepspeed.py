"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo, 2 processes, tiny Llama, LoRA), when deepspeed is installed.

DeepSpeed is not a test dependency (it builds a small communication op with the system's C++ compiler the first
time); ``pip install deepspeed`` to run these. ZeRO-3 partitions every parameter, adapters included, so saving
must gather them and loading must write each rank's partition.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from models import MODELS

import peftkit

pytest.importorskip("deepspeed")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_distributed import TOL, _assert_close, _load  # noqa: E402

STAGES = [2, 3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    cases = ["lora"] + [f"deepspeed_zero{s}" for s in STAGES]  # "lora": the one-process reference
    try:
        import accelerate  # noqa: F401

        cases += [f"accelerate_deepspeed_zero{s}" for s in STAGES]
    except ImportError:  # pragma: no cover - accelerate is a test dependency
        pass
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "dist_worker.py"), str(out), ",".join(cases)],
                          capture_output=True, text=True, timeout=900, env=env)
    errors = "".join(open(out / f).read() for f in os.listdir(out) if ".error_rank" in f)
    assert proc.returncode == 0, f"deepspeed worker failed:\n{errors or proc.stderr[-4000:]}"
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_zero_trains_saves_and_loads(runs, stage):
    d = runs / f"deepspeed_zero{stage}"
    kinds = [open(d / f"kind_rank{r}.txt").read() for r in (0, 1)]
    if stage == 3:  # the adapter's own parameters were partitioned (empty local tensors)
        assert all(k == "3 (0,) True" for k in kinds), kinds
    ref = _load(runs / "lora" / "ref.safetensors")
    gathered = _load(d / "gathered_rank0.safetensors")
    _assert_close(_load(d / "gathered_rank1.safetensors"), gathered, 0.0, "ranks")
    _assert_close(gathered, ref, 1e-5, f"ZeRO-{stage} vs one process")
    saved = _load(d / "saved" / "adapter_model.safetensors")
    _assert_close(saved, gathered, 0.0, "saved folder")
    loaded = peftkit.PeftModel.from_pretrained(MODELS["llama"].build(), d / "saved")
    _assert_close(peftkit.get_adapter_state_dict(loaded.base_model, "default"), saved, 0.0, "loaded in one process")
    for rank in (0, 1):
        _assert_close(_load(d / f"loaded_rank{rank}.safetensors"), saved, 0.0, f"loaded into ZeRO-{stage} (rank {rank})")


@pytest.mark.parametrize("stage", STAGES)
def test_accelerate_deepspeed_plugin(runs, stage):
    """accelerate's DeepSpeed plugin (ZeRO-2 / ZeRO-3, optimizer from the DeepSpeed config): trains like one process;
    ``unwrap_model(model).save_pretrained`` and ``accelerator.save_model`` inside ``adapter_only_state_dict`` both
    write the adapter-only folder (ZeRO-3: gathered), which loads in one process."""
    pytest.importorskip("accelerate")
    d = runs / f"accelerate_deepspeed_zero{stage}"
    kinds = [open(d / f"kind_rank{r}.txt").read().split() for r in (0, 1)]
    assert [k[:3] for k in kinds] == [["DistributedType.DEEPSPEED", "DeepSpeedEngine", str(stage)]] * 2, kinds
    assert [k[-2] for k in kinds] == ["0", "1"], kinds  # accelerate sees both processes (one main process)
    if stage == 3:  # the adapter's parameters are partitioned (empty local tensors)
        assert all(k[3] == "(0,)" and k[-1] == "True" for k in kinds), kinds
    ref = _load(runs / "lora" / "ref.safetensors")
    gathered = _load(d / "gathered_rank0.safetensors")
    _assert_close(_load(d / "gathered_rank1.safetensors"), gathered, 0.0, "ranks")
    _assert_close(gathered, ref, 1e-5, f"accelerate ZeRO-{stage} vs one process")
    for folder in ("saved", "save_model"):
        assert sorted(os.listdir(d / folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        saved = _load(d / folder / "adapter_model.safetensors")
        _assert_close(saved, gathered, 0.0, folder)
        loaded = peftkit.PeftModel.from_pretrained(MODELS["llama"].build(), d / folder)
        _assert_close(peftkit.get_adapter_state_dict(loaded.base_model, "default"), saved, 0.0, f"{folder} loaded")
