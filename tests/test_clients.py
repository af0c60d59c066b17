"""peftkit models in the tools PEFT users train with: transformers' Trainer, TRL's SFTTrainer, accelerate,
sentence-transformers. Tiny models from configs, a tokenizer trained in memory; no network."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from models import VIT_QV

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "my cat likes the warm sun",
    "a small dog sat by the door", "the sun is warm today", "birds fly over the park", "the mat is red",
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def _llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg)


def _lm_rows(tokenizer):
    enc = tokenizer(TEXTS, padding="max_length", max_length=8, truncation=True)
    return [{"input_ids": ids, "attention_mask": m, "labels": ids} for ids, m in zip(enc["input_ids"], enc["attention_mask"])]


def _lora():
    return peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=4, save_steps=2,
                logging_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                dataloader_num_workers=0, save_safetensors=True)
    base.update(kw)
    base = {k: v for k, v in base.items() if k in TrainingArguments.__dataclass_fields__}
    return TrainingArguments(**base)


def _adapter(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


# ------------------------------------------------------------------------------------------------ Trainer
def test_trainer_writes_adapter_only_checkpoints_and_resumes_exactly(tmp_path):
    from transformers import Trainer

    tok = _tokenizer()
    rows = _lm_rows(tok)
    model = peftkit.get_peft_model(_llama(tok), _lora())
    trainer = Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=rows)
    trainer.train()
    full = _adapter(model)

    ckpt = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, f"whole-model weights in an adapter checkpoint: {files}"
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:4]
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "LORA"

    trainer.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    reloaded = peftkit.PeftModel.from_pretrained(_llama(tok), str(tmp_path / "final"))
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, full[name]), name

    # a fresh model resumed from step 2 ends where the uninterrupted run ended
    model_b = peftkit.get_peft_model(_llama(tok), _lora())
    before = _adapter(model_b)
    Trainer(model=model_b, args=_args(tmp_path / "b"), train_dataset=rows).train(resume_from_checkpoint=str(ckpt))
    resumed = _adapter(model_b)
    assert resumed.keys() == full.keys()
    assert any(not torch.equal(before[k], resumed[k]) for k in before)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6, msg=f"{k} differs after resume")


def test_trainer_load_best_model_at_end_reloads_the_best_adapter(tmp_path):
    from transformers import Trainer

    tok = _tokenizer()
    rows = _lm_rows(tok)
    model = peftkit.get_peft_model(_llama(tok), _lora())
    scores = iter([0.1, 0.9, 0.2, 0.3])  # evaluation 2 (step 2) is the best

    def metrics(_pred):
        return {"score": next(scores)}

    snapshots = {}

    class Snap(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = _adapter(model)

    args = _args(tmp_path, eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="score", greater_is_better=True, per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4], compute_metrics=metrics,
                      callbacks=[Snap()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    now = _adapter(model)
    assert set(now) == set(snapshots[2])
    assert any(not torch.equal(snapshots[2][k], snapshots[4][k]) for k in now)
    for k in now:
        assert torch.equal(now[k], snapshots[2][k]), f"{k}: the best checkpoint was not reloaded"
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n), "reloading froze the adapter"
    assert isinstance(model, peftkit.PeftModel) and list(model.peft_config) == ["default"]


def test_peftkit_callback_adds_the_adapter_to_checkpoints(tmp_path):
    from transformers import Trainer

    tok = _tokenizer()
    model = peftkit.get_peft_model(_llama(tok), _lora())
    cb = peftkit.integrations.PeftkitCallback()
    os.makedirs(tmp_path / "checkpoint-3")
    args = _args(tmp_path)

    class State:
        global_step = 3

    cb.on_save(args, State(), None, model=model)
    peftkit.PeftModel.from_pretrained(_llama(tok), str(tmp_path / "checkpoint-3"))
    assert cb.on_log(args, State(), None) is None  # every other event is a no-op
    with pytest.raises(ValueError, match="no peftkit PeftModel"):
        os.makedirs(tmp_path / "checkpoint-4")
        State.global_step = 4
        cb.on_save(args, State(), None, model=torch.nn.Linear(2, 2))
    assert Trainer  # the callback protocol is what Trainer calls; exercised end to end above


# ------------------------------------------------------------------------------------------------ load_adapter
def test_load_adapter_into_an_existing_name_loads_weights_and_keeps_trainability(tmp_path):
    tok = _tokenizer()
    model = peftkit.get_peft_model(_llama(tok), _lora())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path)
    saved = _adapter(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.zero_()
    model.load_adapter(str(tmp_path), "default", is_trainable=True)
    assert list(model.peft_config) == ["default"]
    for name, p in model.named_parameters():
        if name in saved:
            assert torch.equal(p, saved[name]) and p.requires_grad, name
    # a checkpoint that does not fit changes nothing
    peftkit.get_peft_model(_llama(tok), peftkit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "r2")
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(str(tmp_path / "r2"), "default")
    for name, p in model.named_parameters():
        if name in saved:
            assert torch.equal(p, saved[name]), name


# ------------------------------------------------------------------------------------------------ accelerate
def test_accelerate_recognises_peftkit_models():
    pytest.importorskip("peft")
    from accelerate import Accelerator
    from accelerate.utils import is_peft_model

    tok = _tokenizer()
    model = peftkit.get_peft_model(_llama(tok), _lora())
    assert is_peft_model(model)
    assert not is_peft_model(_llama(tok))
    prepared = Accelerator(cpu=True).prepare(model)
    assert is_peft_model(prepared)
    assert type(model) is peftkit.PeftModelForCausalLM  # only isinstance sees PEFT's class


def test_bridge_never_imports_peft_and_keeps_copies_and_pickles_plain():
    import copy
    import pickle
    import subprocess
    import sys

    code = ("import sys, peftkit, copy, pickle; c = peftkit.LoraConfig(r=2); isinstance(c, int); "
            "assert 'peft' not in sys.modules, 'peftkit imported peft'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    pytest.importorskip("peft")
    import peft

    cfg = peftkit.LoraConfig(r=2, target_modules=["q_proj"])
    assert isinstance(cfg, peft.PeftConfig) and type(cfg) is peftkit.LoraConfig
    assert type(copy.deepcopy(cfg)) is peftkit.LoraConfig and copy.deepcopy(cfg) == cfg
    assert type(pickle.loads(pickle.dumps(cfg))) is peftkit.LoraConfig
    import dataclasses

    changed = dataclasses.replace(cfg, r=3)  # builds cfg.__class__(...): the peftkit class, not the bridge
    assert type(changed) is peftkit.LoraConfig and changed.r == 3 and isinstance(changed, peft.PeftConfig)
    tok = _tokenizer()
    model = peftkit.get_peft_model(_llama(tok), _lora())
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and isinstance(clone, peft.PeftModel)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is type(model)
    # PEFT's constructors given a peftkit config build a peftkit model (TRL calls peft.get_peft_model)
    assert type(peft.PeftModel(_llama(tok), peftkit.LoraConfig(r=2, target_modules=["q_proj"]))) is peftkit.PeftModel
    # PEFT's own configs still build PEFT's models
    assert type(peft.get_peft_model(_llama(tok), peft.LoraConfig(r=2, target_modules=["q_proj"]))).__module__.startswith("peft.")


def test_peftkit_aliased_as_peft_builds_models_without_recursing():
    """Code that aliases peftkit as ``peft`` (``sys.modules["peft"] = peftkit``; our PEFT-suite shim does) must not
    bridge peftkit to itself: the constructor hook would call itself until RecursionError."""
    import subprocess
    import sys

    code = ("import sys, torch, peftkit; sys.modules['peft'] = peftkit; import peft\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4)); c = peft.LoraConfig(r=2, target_modules=['0'])\n"
            "pm = peft.get_peft_model(m, c); assert type(pm) is peftkit.PeftModel and pm.__class__ is peftkit.PeftModel\n"
            "assert isinstance(c, peft.PeftConfig) and c.__class__ is peftkit.LoraConfig; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ TRL
def _sft_args(out, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-2, max_steps=2, save_steps=2,
                logging_steps=100, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, max_length=16,
                dataset_text_field="text", packing=False)
    base.update(kw)
    base = {k: v for k, v in base.items() if k in SFTConfig.__dataclass_fields__}
    return SFTConfig(**base)


@pytest.mark.parametrize("how", ["peft_config", "peftkit_model"])
def test_trl_sft_trainer_trains_a_peftkit_adapter(tmp_path, how):
    pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = _tokenizer()
    base = _llama(tok)
    ds = Dataset.from_dict({"text": TEXTS})
    if how == "peft_config":
        trainer = trl.SFTTrainer(model=base, args=_sft_args(tmp_path), train_dataset=ds, processing_class=tok,
                                 peft_config=_lora())
    else:
        trainer = trl.SFTTrainer(model=peftkit.get_peft_model(base, _lora()), args=_sft_args(tmp_path),
                                 train_dataset=ds, processing_class=tok)
    model = trainer.model
    assert type(model) is peftkit.PeftModelForCausalLM, type(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:4]
    before = _adapter(model)
    trainer.train()
    after = _adapter(model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "SFTTrainer did not train the adapter"
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files, files
    loaded = peftkit.PeftModel.from_pretrained(_llama(tok), str(tmp_path / "checkpoint-2"))
    for n, p in loaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, after[n]), n


# ------------------------------------------------------------------------------------------------ sentence-transformers
def _sentence_model(folder):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    tok = _tokenizer()
    if not os.path.isdir(folder):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
        BertModel(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
    word = models.Transformer(str(folder), max_seq_length=16)
    return SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension())], device="cpu")


def test_sentence_transformers_add_and_load_a_peftkit_adapter(tmp_path):
    pytest.importorskip("sentence_transformers")
    st = _sentence_model(tmp_path / "base")
    plain = st.encode(TEXTS[:3], convert_to_tensor=True)
    st.add_adapter(peftkit.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    inner = st.transformers_model
    assert any(type(m).__module__.startswith("peftkit.methods.lora") for m in st.modules()), "not peftkit's layers"
    assert inner._hf_peft_config_loaded and list(inner.peft_config) == ["default"]
    assert st.active_adapters() == ["default"]
    trainable = [n for n, p in st.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:4]
    adapted = st.encode(TEXTS[:3], convert_to_tensor=True)
    assert not torch.allclose(adapted, plain, atol=1e-4)
    st.disable_adapters()
    torch.testing.assert_close(st.encode(TEXTS[:3], convert_to_tensor=True), plain)
    st.enable_adapters()
    inner.save_pretrained(tmp_path / "adapter")  # transformers' save: PEFT format, adapter only
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    assert all(k.startswith("base_model.model.") and "lora_" in k for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))

    fresh = _sentence_model(tmp_path / "base")
    fresh.load_adapter(str(tmp_path / "adapter"), peft_config=peftkit.PeftConfig.from_pretrained(str(tmp_path / "adapter")))
    torch.testing.assert_close(fresh.encode(TEXTS[:3], convert_to_tensor=True), adapted)
    assert any(type(m).__module__.startswith("peftkit.") for m in fresh.modules())
    # a PEFT-format folder also loads into peftkit through the plain call once the model holds peftkit adapters
    fresh.load_adapter(str(tmp_path / "adapter"), adapter_name="second")
    assert set(fresh.transformers_model.peft_config) == {"default", "second"}
    fresh.set_adapter("second")
    torch.testing.assert_close(fresh.encode(TEXTS[:3], convert_to_tensor=True), adapted)
    fresh.delete_adapter(["default", "second"])
    torch.testing.assert_close(fresh.encode(TEXTS[:3], convert_to_tensor=True), plain)
    assert not any(type(m).__module__.startswith("peftkit.") for m in fresh.modules())


# ------------------------------------------------------------------------------------------------ AdaLoRA budgeting
def _vit_and_data(n=32):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    labels = ["apple", "bread", "cake"]
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16,
                    patch_size=4, num_labels=3, label2id={l: i for i, l in enumerate(labels)},
                    id2label={i: l for i, l in enumerate(labels)})
    g = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "label": i % 3} for i in range(n)]
    return ViTForImageClassification(cfg), rows


def _collate_fn(examples):  # the seed guide's collator
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["label"] for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}


def _seed_adalora_config(total_step):
    # the seed guide's config, scaled to a 10-step run (total_step is required, as in Hugging Face PEFT)
    return peftkit.AdaLoraConfig(r=8, init_r=12, tinit=2, tfinal=3, deltaT=1, total_step=total_step,
                                 target_modules=VIT_QV, modules_to_save=["classifier"])


def _ranks(pattern):
    return {k: sum(v) for k, v in pattern.items()}


def test_adalora_budgets_in_a_plain_trainer_run_as_in_the_seed_guide(tmp_path):
    from transformers import Trainer, TrainingArguments, ViTImageProcessor

    model, rows = _vit_and_data()
    model = peftkit.get_peft_model(model, _seed_adalora_config(total_step=10))
    model.print_trainable_parameters()
    image_processor = ViTImageProcessor(size={"height": 16, "width": 16})
    kw = dict(remove_unused_columns=False, eval_strategy="epoch", save_strategy="epoch", learning_rate=5e-3,
              per_device_train_batch_size=4, gradient_accumulation_steps=4, per_device_eval_batch_size=4,
              num_train_epochs=5, logging_steps=10, load_best_model_at_end=True, label_names=["labels"],
              report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    args = TrainingArguments(str(tmp_path / "vit-adalora"), **{k: v for k, v in kw.items() if k in TrainingArguments.__dataclass_fields__})
    trainer = Trainer(
        model,
        args,
        train_dataset=rows,
        eval_dataset=rows[:8],
        processing_class=image_processor,
        data_collator=_collate_fn,
    )
    trainer.train()
    assert trainer.state.global_step == 10
    pattern = model.peft_config["default"].rank_pattern
    assert pattern, "no budgeting happened: rank_pattern is empty after Trainer.train()"
    ranks = _ranks(pattern)
    assert len(ranks) == 4 and sum(ranks.values()) == 8 * 4, ranks  # target_r=8 on average, from init_r=12
    assert all(r < 12 for r in ranks.values()) or sum(ranks.values()) < 12 * 4
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and sum(sum(m) for m in saved["rank_pattern"].values()) == 32
    tensors = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    e = {k: v for k, v in tensors.items() if k.endswith("lora_E")}
    assert sum(v.shape[0] for v in e.values()) == 32, "the saved adapter was not shrunk to the kept ranks"
    # every epoch checkpoint holds a shrunk adapter once the budget started; the best one was reloaded into the
    # live model (load_adapter on the existing name restores the pruned ranks as zeros)
    best = trainer.state.best_model_checkpoint
    best_tensors = load_file(os.path.join(best, "adapter_model.safetensors"))
    best_pattern = json.loads(open(os.path.join(best, "adapter_config.json")).read())["rank_pattern"]
    live = model.base_model.triplets("default")
    for key, mask in (best_pattern or {}).items():
        keep = torch.tensor(mask)
        stored = best_tensors["base_model.model." + key]
        assert torch.equal(live[key][1][keep].detach(), stored)
        assert torch.count_nonzero(live[key][1][~keep]) == 0


def _loop(model, rows, steps, explicit):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for step in range(steps):
        batch = _collate_fn(rows[4 * step: 4 * step + 4])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        if explicit:
            model.base_model.update_and_allocate(step)
        opt.zero_grad()


def test_adalora_budgets_in_a_plain_pytorch_loop_like_explicit_calls():
    import copy

    base, rows = _vit_and_data(40)
    auto = peftkit.get_peft_model(copy.deepcopy(base), _seed_adalora_config(total_step=10))
    manual = copy.deepcopy(auto)
    off = copy.deepcopy(auto)
    off.base_model.budget_mode = "off"
    _loop(auto, rows, 10, explicit=False)
    _loop(manual, rows, 10, explicit=True)
    _loop(off, rows, 10, explicit=False)
    assert auto.base_model.budget_mode == "auto" and manual.base_model.budget_mode == "explicit"
    pattern = auto.peft_config["default"].rank_pattern
    assert pattern and sum(_ranks(pattern).values()) == 32
    assert pattern == manual.peft_config["default"].rank_pattern
    for (n, p), (_, q) in zip(auto.named_parameters(), manual.named_parameters()):
        assert torch.equal(p, q), n
    assert not off.peft_config["default"].rank_pattern, "budget_mode='off' still budgeted"


NO_PEFT = r'''
import importlib.abc, importlib.util, sys
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "peft" else _find_spec(name, *a, **k)
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "peft":
            raise ModuleNotFoundError("No module named 'peft'", name=name)
sys.meta_path.insert(0, _Hide())
sys.path.insert(0, sys.argv[2])
import os, torch
import peftkit, test_clients as t
from transformers import Trainer
from transformers.utils import is_peft_available
assert not is_peft_available()
out = sys.argv[1]
tok = t._tokenizer(); rows = t._lm_rows(tok)
model = peftkit.get_peft_model(t._llama(tok), t._lora())
Trainer(model=model, args=t._args(out + "/a"), train_dataset=rows, callbacks=[peftkit.integrations.PeftkitCallback()]).train()
files = set(os.listdir(out + "/a/checkpoint-2"))
assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= files, files
full = t._adapter(model)
model_b = peftkit.get_peft_model(t._llama(tok), t._lora())
Trainer(model=model_b, args=t._args(out + "/b"), train_dataset=rows).train(resume_from_checkpoint=out + "/a/checkpoint-2")
for k, v in t._adapter(model_b).items():
    torch.testing.assert_close(v, full[k], rtol=0, atol=1e-6)
reloaded = peftkit.PeftModel.from_pretrained(t._llama(tok), out + "/a/checkpoint-4")
for n, p in reloaded.named_parameters():
    if "lora_" in n:
        assert torch.equal(p, full[n]), n
assert "peft" not in sys.modules
print("ok")
'''


def test_trainer_without_peft_installed_resumes_and_the_callback_writes_adapters(tmp_path):
    """Without peft, Trainer saves whole state dicts (which resume exactly); PeftkitCallback adds the adapter."""
    import subprocess
    import sys

    script = tmp_path / "no_peft.py"
    script.write_text(NO_PEFT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script), str(tmp_path), os.path.dirname(__file__)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.stdout.strip().endswith("ok"), (out.stdout[-2000:], out.stderr[-4000:])


def test_sentence_transformers_trainer_checkpoints_the_peftkit_adapter_and_resumes(tmp_path):
    pytest.importorskip("sentence_transformers")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses

    ds = Dataset.from_dict({"anchor": TEXTS[:4], "positive": TEXTS[4:]})
    args = SentenceTransformerTrainingArguments(str(tmp_path / "out"), max_steps=2, save_steps=1,
                                                per_device_train_batch_size=4, use_cpu=True, report_to=[],
                                                learning_rate=1e-2, disable_tqdm=True, seed=0)
    runs = []
    for resume in (None, str(tmp_path / "out" / "checkpoint-1")):
        st = _sentence_model(tmp_path / "base")
        st.add_adapter(peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
        before = _adapter(st)
        trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=ds,
                                             loss=losses.MultipleNegativesRankingLoss(st))
        trainer.train(resume_from_checkpoint=resume)
        runs.append(_adapter(st))
        assert any(not torch.equal(before[k], runs[-1][k]) for k in before)
    files = set(os.listdir(tmp_path / "out" / "checkpoint-1"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files, files
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=0, atol=1e-6, msg=k)
