"""``peftkit bench`` / ``peftkit train`` with (IA)^3, LN tuning and BitFit on the CLI tests' tiny BERT: the
methods run with their own default targets, and (IA)^3 / LN tuning count the same parameters as Hugging Face PEFT."""

import json

import pytest
from test_cli import _load_tiny, one_thread, tiny  # noqa: F401  (fixtures)

from peftkit.cli import main


def test_bench_selective_methods_against_peft(tiny, tmp_path):  # noqa: F811
    pytest.importorskip("peft")
    model_dir, data = tiny
    out = tmp_path / "bench"
    rc = main(["bench", "--model", model_dir, "--data", data, "--text-column", "sentence", "--label-column",
               "sentiment", "--methods", "ia3,ln_tuning,bitfit", "--steps", "2", "--batch-size", "8",
               "--train-size", "32", "--test-size", "16", "--infer-batches", "1", "--in-process", "--no-progress",
               "--against", "peft", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["library"]): r for r in report["results"]}
    assert not any("error" in r for r in rows.values()), [r.get("error") for r in rows.values()]
    assert set(rows) == {("ia3", "peftkit"), ("ia3", "peft"), ("ln_tuning", "peftkit"), ("ln_tuning", "peft"),
                         ("bitfit", "peftkit")}  # PEFT has no BitFit
    base = _load_tiny(model_dir)
    head = sum(p.numel() for p in base.classifier.parameters())
    for m in ("ia3", "ln_tuning"):
        assert rows[(m, "peftkit")]["trainable_params"] == rows[(m, "peft")]["trainable_params"]
        assert rows[(m, "peftkit")]["infer_tokens_per_s_merged"] > 0
    # (IA)^3 on BERT (PEFT's defaults): key, value (outputs: 32 each) and both output.dense layers (inputs: 32, 37)
    assert rows[("ia3", "peftkit")]["trainable_params"] == 2 * (32 + 32 + 32 + 37) + head
    ln = sum(p.numel() for n, p in base.named_parameters() if "LayerNorm" in n)
    assert rows[("ln_tuning", "peftkit")]["trainable_params"] == ln + head
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith("bias") and not n.startswith("classifier"))
    bitfit = rows[("bitfit", "peftkit")]
    assert bitfit["trainable_params"] == biases + head
    assert head < bitfit["changed_params"] <= biases + head  # merged: only biases (and the head) differ
