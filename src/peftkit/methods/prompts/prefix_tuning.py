"""Prefix tuning (Li & Liang, 2021): trained key/value prefixes in every attention layer, passed through the model's
own KV cache (transformers' ``Cache`` classes).

``PrefixTuningConfig`` follows Hugging Face PEFT (fields, the ``prompt_embeddings`` checkpoint key holding the
prefixes as (tokens, layers * 2 * token_dim)). With ``prefix_projection`` the prefixes are reparameterised during
training by an MLP (``transform``: Linear(token_dim, encoder_hidden_size), Tanh, Linear(.., layers * 2 * token_dim))
from a (tokens, token_dim) table; checkpoints hold the MLP's output, so inference needs no MLP
(:meth:`~peftkit.engine.prompting.PromptLearningModel.export_prompt` does the same in memory).

The prefix has ``num_attention_heads`` heads of ``token_dim // num_attention_heads`` each; both default to what the
attention layers cache: ``num_key_value_heads`` heads (grouped-query attention) of ``head_dim`` (or T5's ``d_kv``),
so models whose head size is not hidden / heads work too. Encoder-decoder models get the prefixes in the decoder's
self-attention (PEFT's behaviour). :class:`PrefixEncoder` is reusable as a component of other methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from peftkit.engine.config import PeftType
from peftkit.engine.prompting import PREFIX, PromptLearningConfig, PromptLearningModel, PromptModule
from peftkit.engine.registry import MethodSpec, register_method


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of prefix tuning (``prefix_projection``: the MLP reparameterisation; ``encoder_hidden_size``: its
    width, default ``token_dim``; ``init_weights="zero"``: prefixes start at zero)."""

    init_weights: Optional[Literal["zero"]] = field(default=None, metadata={"help": "None (random) or 'zero'."})
    encoder_hidden_size: Optional[int] = field(default=None, metadata={"help": "Hidden size of the prefix MLP."})
    prefix_projection: bool = field(default=False, metadata={"help": "Reparameterise the prefixes with an MLP."})

    prompt_kind = PREFIX

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}.")

    def build_prompt_module(self, model: nn.Module, word_embeddings: nn.Embedding, table: bool) -> PromptModule:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
        return PrefixEncoder(self.num_virtual_tokens, self.token_dim, self.num_layers, self.encoder_hidden_size,
                             projection=self.prefix_projection and not table, zero_init=self.init_weights == "zero")


class PrefixEncoder(PromptModule):
    """Prefixes for ``num_layers`` layers: (tokens, num_layers * 2 * token_dim), from a table or through the MLP.

    Each layer's share is computed by its own small graph (:meth:`layer_prefixes`; with the MLP, its first layer runs
    once per attention layer, a (tokens x token_dim x hidden) product): reentrant activation checkpointing runs one
    backward per layer, and a graph shared by all layers would be freed by the first."""

    def __init__(self, tokens: int, token_dim: int, num_layers: int, hidden: int, projection: bool, zero_init: bool = False) -> None:
        out = num_layers * 2 * token_dim
        super().__init__(tokens, token_dim if projection else out)
        self.projection = projection
        self.num_layers = num_layers
        self.layer_width = 2 * token_dim
        if projection:
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        elif zero_init:
            nn.init.zeros_(self.embedding.weight)

    @property
    def is_table(self) -> bool:
        return not self.projection

    def layer_prefixes(self, layers: Sequence[int]) -> list[torch.Tensor]:
        """The (tokens, 2 * token_dim) shares (keys, then values) of ``layers``, one separately computed tensor per
        entry (a layer listed twice, as in PEFT's encoder-decoder layout, gets two)."""
        w = self.layer_width
        if not self.projection:
            table = self.embedding.weight
            return [table[:, i * w:(i + 1) * w] for i in layers]
        first, act, last = self.transform
        return [F.linear(act(first(self.embedding.weight)), last.weight[i * w:(i + 1) * w], last.bias[i * w:(i + 1) * w])
                for i in layers]

    def encode(self, table: torch.Tensor) -> torch.Tensor:
        # the saved prefix is the layers' shares side by side, computed as the forward computes them
        return torch.cat(self.layer_prefixes(range(self.num_layers)), dim=1)


PREFIX_TUNING = register_method(
    MethodSpec(
        peft_type=PeftType.PREFIX_TUNING.value,
        config_cls=PrefixTuningConfig,
        create_layer=lambda *a, **k: None,
        prefix="prompt_encoder.",
        model_cls=PromptLearningModel,
        supports_mixed_batch=False,
        supports_merge=False,
    )
)
