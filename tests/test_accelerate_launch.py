"""The accelerate config files of docs/distributed.md parse with accelerate's own config loader; the accelerate
script of the docs runs on 2 CPU processes started with ``ACCELERATE_USE_CPU=true torchrun`` (offline).
(``accelerate launch --config_file`` cannot start 2 distributed CPU processes without MPI in accelerate 1.15:
see docs/distributed.md.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from models import MODELS

import peftkit

pytest.importorskip("accelerate")
yaml = pytest.importorskip("yaml")

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, os.pardir, "docs", "distributed.md")
FOLDER = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _doc_yamls() -> list[str]:
    with open(DOC, encoding="utf-8") as fh:
        return re.findall(r"```yaml\n(.*?)```", fh.read(), flags=re.S)


def test_doc_configs_parse_with_accelerate(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    blocks = _doc_yamls()
    kinds = sorted(yaml.safe_load(b)["distributed_type"] for b in blocks)
    assert kinds == ["DEEPSPEED", "DEEPSPEED", "FSDP"], kinds
    for i, block in enumerate(blocks):
        path = tmp_path / f"cfg{i}.yaml"
        path.write_text(block)
        cfg = load_config_from_file(str(path))  # accelerate's loader: unknown keys or values are refused
        assert cfg.num_processes == 2
        if cfg.distributed_type == "FSDP":
            assert cfg.fsdp_config["fsdp_version"] == 2
            assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        if cfg.distributed_type == "DEEPSPEED":
            stage = cfg.deepspeed_config["zero_stage"]
            assert stage in (2, 3)
            if stage == 3:  # accelerator.save_model under ZeRO-3 needs the 16-bit gather
                assert cfg.deepspeed_config["zero3_save_16bit_model"] is True


def test_accelerate_script_on_two_cpu_processes(tmp_path):
    """The command of docs/distributed.md: ``ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2``."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(HERE, "accelerate_script.py"), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kinds = [open(out / f"kind_rank{r}.txt").read().split() for r in (0, 1)]  # two ranks, each its own file
    assert all(k[:2] == ["DistributedType.MULTI_CPU", "DistributedDataParallel"] for k in kinds), kinds
    for folder in ("saved", "save_model"):
        assert sorted(os.listdir(out / folder)) == FOLDER, folder
    from safetensors.torch import load_file

    a, b = load_file(out / "saved" / FOLDER[2]), load_file(out / "save_model" / FOLDER[2])
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    base = MODELS["llama"].build()
    loaded = peftkit.PeftModel.from_pretrained(base, out / "save_model")
    got = peftkit.get_adapter_state_dict(loaded.base_model, "default")
    assert all(torch.equal(got[k], a[k]) for k in a)
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # trained (B starts at zero)
