"""peftkit models in the tools PEFT users train with: transformers' Trainer, TRL's SFTTrainer, accelerate,
sentence-transformers. Tiny models from configs, a tokenizer trained in memory; no network."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import peftkit

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
    tok = _tokenizer()
    model = peftkit.get_peft_model(_llama(tok), _lora())
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and isinstance(clone, peft.PeftModel)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is type(model)
    # PEFT's own configs still build PEFT's models
    assert type(peft.get_peft_model(_llama(tok), peft.LoraConfig(r=2, target_modules=["q_proj"]))).__module__.startswith("peft.")


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
