"""``peftkit bench --suite survey`` (issue 15, section 1): the machinery on a tiny BERT and CSV with a tiny budget.
The recorded run on the default model is a command in BENCHMARKS.md, not a test."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest

import peftkit.cli.survey as survey
from peftkit.cli import main
from peftkit.cli.data import load_text_dataset
from peftkit.cli.survey import SURVEY_ROWS, SurveyArgs, noise_warnings, plan_rows, registered, split_three
from peftkit.engine.registry import supported_methods
from test_cli import _load_tiny, one_thread, tiny  # noqa: F401  (fixtures)

ROWS = "full,lora_qv,krona,houlsby,adalora"


def _argv(tiny, out, *extra):
    model_dir, data = tiny
    return ["bench", "--suite", "survey", "--model", model_dir, "--data", data, "--text-column", "sentence",
            "--label-column", "sentiment", "--train-size", "60", "--test-size", "20", "--val-size", "12",
            "--epochs", "1", "--min-steps", "4", "--batch-size", "8", "--microbatch", "4", "--seeds", "2",
            "--max-length", "16", "--infer-batches", "1", "--in-process", "--no-progress", "--out", str(out), *extra]


def _hide_houlsby(mp):
    """One survey row whose method is "not registered", to exercise the missing-row path whatever is registered."""
    houlsby = next(s for s in SURVEY_ROWS if s.name == "houlsby").candidates
    real = survey.registered
    mp.setattr(survey, "registered", lambda candidates: None if candidates == houlsby else real(candidates))


@pytest.fixture(scope="module")
def suite(tiny, tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("survey")
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        _hide_houlsby(mp)
        assert main(_argv(tiny, out, "--methods", ROWS)) == 0
    return out, json.loads((out / "results.json").read_text()), buf.getvalue()


def test_plan_has_the_survey_rows_then_every_other_method():
    rows = plan_rows()
    names = [r["name"] for r in rows]
    assert names[:15] == ["full", "houlsby", "pfeiffer", "parallel", "ia3", "prefix_tuning", "prompt_tuning",
                          "ln_tuning", "lora_qv", "lora_all", "krona", "mam", "compacter", "compacter++", "unipelt"]
    assert all(r["survey"] for r in rows[:15]) and not any(r["survey"] for r in rows[15:])
    for r in rows[:15]:  # a row is missing exactly when no candidate is registered, and it is kept
        spec = next(s for s in SURVEY_ROWS if s.name == r["name"])
        assert (r["status"] == "missing") == (r["name"] != "full" and registered(spec.candidates) is None)
    used = {r["method"] for r in rows[:15] if r["method"]}
    extras = {r["method"] for r in rows[15:]}
    assert extras == set(supported_methods()) - used  # every other registered method, once
    assert next(r for r in rows if r["method"] == "XLORA")["status"] == "skipped"


def test_rows_are_found_by_registry_name_at_run_time(monkeypatch):
    monkeypatch.setattr(survey, "available_methods",
                        lambda: ["lora", "double_seq_bn", "compacter_pp", "ln_tuning", "full", "head"])
    assert registered(("double_seq_bn", "houlsby")) == "DOUBLE_SEQ_BN"
    assert registered(("compacter++", "compacterpp")) == "COMPACTER_PP"
    rows = {r["name"]: r for r in plan_rows()}
    assert rows["houlsby"]["status"] == "planned" and rows["compacter++"]["method"] == "COMPACTER_PP"
    assert rows["pfeiffer"]["status"] == "missing"


def test_validation_split_is_carved_from_training_rows(tiny):
    args = SurveyArgs(data=tiny[1], text_column="sentence", label_column="sentiment", train_size=60, test_size=20,
                      val_size=0.2)
    fit, val, test = split_three(load_text_dataset(tiny[1], "sentence", "sentiment"), args)
    assert (len(fit), len(val), len(test)) == (48, 12, 20)
    from peftkit.cli.data import split_dataset

    train, test2 = split_dataset(load_text_dataset(tiny[1], "sentence", "sentiment"), 60, 20, 0)
    assert test.texts == test2.texts and sorted(fit.texts + val.texts) == sorted(train.texts)


def test_protocol_sweep_then_seeds(suite):
    out, report, _ = suite
    s = report["setup"]
    assert s["microbatch"] == 4 and s["accumulation"] == 2 and s["fit_rows"] == 48 and s["val_rows"] == 12
    assert s["train_steps"] == max(4, math.ceil(1 * 48 / 8))
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["full", "houlsby", "lora_qv", "krona", "adalora"]  # the suite's order, missing kept
    assert rows["houlsby"]["status"] == "missing"  # made unregistered by the fixture
    for name in ("full", "lora_qv", "krona", "adalora"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert [x["lr"] for x in r["sweep"]] == [1e-3, 1e-4, 1e-5]
        best = max(r["sweep"], key=lambda x: (x["val_score"], -[1e-3, 1e-4, 1e-5].index(x["lr"])))
        assert r["best_lr"] == best["lr"]  # chosen on validation rows, not test rows
        assert r["n_seeds"] == 2 and r["test_scores"][0] == best["test_score"]
        assert r["score_mean"] == pytest.approx(statistics.mean(r["test_scores"]))
        assert r["score_std"] == pytest.approx(statistics.stdev(r["test_scores"]))
        assert r["train_steps"] == s["train_steps"] and r["peak_memory_mib"] > 0 and r["checkpoint_bytes"] > 0
        assert r["train_tokens_per_s"] > 0 and r["infer_tokens_per_s_unmerged"] > 0
    base = _load_tiny(report["setup"]["model"])
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in base.parameters())
    assert rows["lora_qv"]["config"]["target_modules"] in (["query", "value"], ["value", "query"])
    assert rows["lora_qv"]["update_rank"]["matrices"] == 4  # 2 layers x (query, value)
    assert rows["krona"]["config"]["peft_type"] == "LOKR" and rows["krona"]["infer_tokens_per_s_merged"] > 0
    phases = rows["adalora"]["phases"]  # multi-phase method: figures per phase
    assert phases and sum(p["steps"] for p in phases) == s["train_steps"]
    # one file per (row, lr, seed) run: 4 rows x (3 rates + 1 more seed)
    assert len(os.listdir(out / "runs")) == 16


def test_reference_rows_and_noise_warning(suite, tiny):
    _, report, printed = suite
    refs = {r["name"]: r for r in report["references"]}
    args = SurveyArgs(data=tiny[1], text_column="sentence", label_column="sentiment", train_size=60, test_size=20,
                      val_size=12)
    fit, _, test = split_three(load_text_dataset(tiny[1], "sentence", "sentiment"), args)
    majority = max((0, 1), key=fit.labels.count)
    assert refs["constant"]["score_mean"] == pytest.approx(test.labels.count(majority) / len(test))
    assert refs["linear_probe"]["status"] == "ok" and refs["linear_probe"]["n_seeds"] == 2
    for w in report["warnings"]:
        assert w in printed
    rows = [{"name": "a", "status": "ok", "score_mean": 0.52, "score_std": 0.01},
            {"name": "b", "status": "ok", "score_mean": 0.90, "score_std": 0.01}]
    warn = noise_warnings(rows, [{"name": "constant", "score_mean": 0.5}], 500)
    assert len(warn) == 1 and "within noise of the constant predictor" in warn[0] and ": a." in warn[0]
    assert rows[0]["within_noise_of_constant"] and not rows[1]["within_noise_of_constant"]
    assert "too short" in noise_warnings(rows[:1], [{"name": "constant", "score_mean": 0.5}], 500)[0]
    assert noise_warnings(rows[1:], [{"name": "constant", "score_mean": 0.5}], 500) == []


def test_outputs_charts_report_progress(suite):
    out, report, printed = suite
    assert report["schema"] == "peftkit-bench-survey/1"
    for name in ("score_vs_params.png", "score_vs_memory.png", "throughput_vs_memory.png"):
        assert os.path.getsize(out / name) > 5000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "src='http" not in page and "missing" in page
    assert "runs 0 done / 16 left" in printed and "ETA" in printed and "row 4/4 adalora" in printed
    assert "houlsby" in printed


def test_resume_reuses_finished_runs(suite, tiny, monkeypatch, capsys):
    out, report, _ = suite
    calls = []
    real = survey.run_one

    def counting(*a, **k):
        calls.append(a[1]["name"])
        return real(*a, **k)

    monkeypatch.setattr(survey, "run_one", counting)
    _hide_houlsby(monkeypatch)
    os.remove(out / "runs" / "krona__lr0.0001__seed0.json")  # as if interrupted in that run
    assert main(_argv(tiny, out, "--methods", ROWS)) == 0
    assert calls == ["krona"]
    again = json.loads((out / "results.json").read_text())
    a = {r["name"]: r.get("score_mean") for r in report["rows"]}
    b = {r["name"]: r.get("score_mean") for r in again["rows"]}
    assert {k: v for k, v in a.items() if k != "krona"} == {k: v for k, v in b.items() if k != "krona"}
    assert "runs 9 done / 7 left" in capsys.readouterr().out  # full, lora_qv and krona at 1e-3 reused
    # a different setup does not reuse them
    calls.clear()
    assert main(_argv(tiny, out, "--methods", "lora_qv", "--lrs", "1e-3", "--seeds", "1", "--min-steps", "5")) == 0
    assert calls == ["lora_qv"]


def test_options_checked_before_any_run(tiny, tmp_path, monkeypatch, capsys):
    def boom(*_a, **_k):
        raise AssertionError("a run started before the options were checked")

    monkeypatch.setattr(survey, "run_one", boom)
    assert main(_argv(tiny, tmp_path, "--methods", "lora_qv", "-o", "lora:rank=4")) == 2
    assert "Did you mean r" in capsys.readouterr().err
    assert main(_argv(tiny, tmp_path, "--methods", "nosuchrow")) == 2
    assert "not a row of the survey suite" in capsys.readouterr().err
    assert main(_argv(tiny, tmp_path, "--batch-size", "6", "--microbatch", "4")) == 2
    assert "must divide" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter per run: about a minute on a loaded 2-core machine
def test_isolated_worker(tiny, tmp_path):
    argv = [a for a in _argv(tiny, tmp_path, "--methods", "lora_qv", "--lrs", "1e-3", "--seeds", "1", "--threads", "1")
            if a != "--in-process"]
    assert main(argv) == 0
    r = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert r["status"] == "ok" and r["memory_isolated"] is True and r["sweep"][0]["lr"] == 1e-3


def test_survey_options_need_the_suite(tiny, capsys):
    model_dir, data = tiny
    assert main(["bench", "--model", model_dir, "--data", data, "--seeds", "5", "--in-process"]) == 2
    assert "--seeds belongs to the survey protocol: add --suite survey" in capsys.readouterr().err
