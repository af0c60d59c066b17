"""Prompt tuning (Lester et al., 2021): trained soft tokens prepended to the input embeddings.

``PromptTuningConfig`` follows Hugging Face PEFT (field names, defaults, the ``prompt_embeddings`` checkpoint key). The
table has ``num_virtual_tokens * num_transformer_submodules`` rows, as in PEFT; on encoder-decoder models the first
``num_virtual_tokens`` go in front of the encoder's input (PEFT's layout; the other rows are unused).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType
from peftkit.engine.prompting import PromptLearningConfig, PromptLearningModel, PromptModule
from peftkit.engine.registry import MethodSpec, register_method


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of prompt tuning.

    ``prompt_tuning_init``: ``RANDOM`` (normal init), ``SAMPLE_VOCAB`` (embeddings of random vocabulary tokens) or
    ``TEXT`` (embeddings of ``prompt_tuning_init_text`` tokenised with ``tokenizer_name_or_path``, repeated or cut
    to the prompt length).
    """

    prompt_tuning_init: Union[PromptTuningInit, str] = field(
        default=PromptTuningInit.RANDOM, metadata={"help": "RANDOM, SAMPLE_VOCAB or TEXT."}
    )
    prompt_tuning_init_text: Optional[str] = field(default=None, metadata={"help": "Init text (TEXT init)."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer for the TEXT init."})
    tokenizer_kwargs: Optional[dict] = field(default=None, metadata={"help": "AutoTokenizer.from_pretrained kwargs (TEXT init)."})

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PROMPT_TUNING
        super().__post_init__()
        try:
            self.prompt_tuning_init = PromptTuningInit(str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper())
        except ValueError:
            raise ValueError(
                f"prompt_tuning_init must be one of RANDOM, SAMPLE_VOCAB, TEXT; got {self.prompt_tuning_init!r}."
            ) from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer folder or hub id).")
            if self.prompt_tuning_init_text is None:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text.")
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'.")

    def build_prompt_module(self, model: nn.Module, word_embeddings: nn.Embedding, table: bool) -> PromptModule:
        module = PromptModule(self.total_virtual_tokens, self.token_dim)
        if table or self.prompt_tuning_init == PromptTuningInit.RANDOM:
            return module
        rows = self.total_virtual_tokens
        if self.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (rows,), device=word_embeddings.weight.device)
        else:
            ids = torch.tensor(self._text_token_ids(rows), dtype=torch.long, device=word_embeddings.weight.device)
            if int(ids.max()) >= word_embeddings.num_embeddings:
                raise ValueError(
                    f"The tokenizer {self.tokenizer_name_or_path!r} produced token id {int(ids.max())}, beyond the "
                    f"model's vocabulary ({word_embeddings.num_embeddings}); use the model's own tokenizer."
                )
        if ids.numel() and self.token_dim != word_embeddings.weight.shape[1]:
            raise ValueError(f"token_dim ({self.token_dim}) differs from the model's embedding size "
                             f"({word_embeddings.weight.shape[1]}); the {self.prompt_tuning_init.value} init needs them equal.")
        with torch.no_grad():
            module.embedding.weight.copy_(word_embeddings(ids).detach().float())
        return module

    def _text_token_ids(self, rows: int) -> list[int]:
        from transformers import AutoTokenizer

        kwargs = dict(self.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # loading a config must never run code
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **kwargs)
        ids = list(tokenizer(self.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError("prompt_tuning_init_text tokenises to no tokens; give a non-empty text.")
        ids = (ids * math.ceil(rows / len(ids)))[:rows]
        return ids


PROMPT_TUNING = register_method(
    MethodSpec(
        peft_type=PeftType.PROMPT_TUNING.value,
        config_cls=PromptTuningConfig,
        create_layer=lambda *a, **k: None,  # model-level: the engine places the prompt, no layer is wrapped
        prefix="prompt_encoder.",
        model_cls=PromptLearningModel,
        supports_mixed_batch=False,
        supports_merge=False,
    )
)
