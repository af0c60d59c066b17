"""Tiny random-init models of each family the library supports, built from configs (no network).

Each entry gives a builder, example inputs, how to read a tensor output, and a training loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, Any]]  # batch size -> kwargs
    output: Callable[[Any], torch.Tensor]
    loss: Callable[[Any, dict[str, Any]], torch.Tensor]


VOCAB = 96


def _ids(batch: int, length: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    image_size=16, patch_size=4, num_labels=3)
    return ViTForImageClassification(cfg).eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.lin = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.lin(h.mean(dim=(2, 3)))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN().eval()


def _lm_loss(out, kw):
    return out.loss


def _cls_targets(n: int) -> torch.Tensor:
    return torch.arange(n) % 3


def _vit_attention_names() -> list[str]:
    """ViT's query/value projections: ``q_proj``/``v_proj`` from transformers 5.9, ``query``/``value`` before."""
    from transformers import ViTConfig, ViTModel

    with torch.device("meta"):
        vit = ViTModel(ViTConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4,
                                 image_size=4, patch_size=2))
    names = {n.rsplit(".", 1)[-1] for n, _ in vit.named_modules()}
    return ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]


VIT_QV = _vit_attention_names()  # target_modules of the ViT cases, for every transformers version

MODELS: dict[str, ModelSpec] = {
    "llama": ModelSpec("llama", _llama, lambda b: {"input_ids": _ids(b)}, lambda o: o.logits,
                       lambda m, kw: m(**kw, labels=kw["input_ids"]).loss),
    "gpt2": ModelSpec("gpt2", _gpt2, lambda b: {"input_ids": _ids(b)}, lambda o: o.logits,
                      lambda m, kw: m(**kw, labels=kw["input_ids"]).loss),
    "bert": ModelSpec("bert", _bert, lambda b: {"input_ids": _ids(b)}, lambda o: o.logits,
                      lambda m, kw: m(**kw, labels=_cls_targets(kw["input_ids"].shape[0])).loss),
    "t5": ModelSpec("t5", _t5, lambda b: {"input_ids": _ids(b), "decoder_input_ids": _ids(b, 5, seed=2)},
                    lambda o: o.logits, lambda m, kw: m(input_ids=kw["input_ids"], labels=kw["decoder_input_ids"]).loss),
    "vit": ModelSpec("vit", _vit,
                     lambda b: {"pixel_values": torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(3))},
                     lambda o: o.logits,
                     lambda m, kw: m(**kw, labels=_cls_targets(kw["pixel_values"].shape[0])).loss),
    "mlp": ModelSpec("mlp", _mlp, lambda b: {"x": torch.randn(b, 16, generator=torch.Generator().manual_seed(4))},
                     lambda o: o, lambda m, kw: nn.functional.cross_entropy(m(**kw), _cls_targets(kw["x"].shape[0]) % 4)),
    "cnn": ModelSpec("cnn", _cnn, lambda b: {"x": torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(5))},
                     lambda o: o, lambda m, kw: nn.functional.cross_entropy(m(**kw), _cls_targets(kw["x"].shape[0]) % 4)),
}
