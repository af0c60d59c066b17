"""P-tuning (Liu et al., 2021): soft tokens produced by a small encoder (MLP or bidirectional LSTM + MLP) from a
trained table, prepended to the input embeddings.

``PromptEncoderConfig`` and the module layout (``embedding``, ``mlp_head``, ``lstm_head``) follow Hugging Face PEFT.
A checkpoint holds the encoder's output (``prompt_embeddings``); a loaded adapter uses it as a plain table.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftType
from peftkit.engine.prompting import PromptLearningConfig, PromptLearningModel, PromptModule
from peftkit.engine.registry import MethodSpec, register_method

logger = logging.getLogger(__name__)


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of P-tuning: ``encoder_reparameterization_type`` MLP (three linear layers with ReLU) or LSTM
    (``encoder_num_layers`` bidirectional layers, then a two-layer MLP); ``encoder_hidden_size`` defaults to
    ``token_dim``."""

    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = field(
        default=PromptEncoderReparameterizationType.MLP, metadata={"help": "MLP or LSTM."}
    )
    encoder_hidden_size: Optional[int] = field(default=None, metadata={"help": "Hidden size of the prompt encoder."})
    encoder_num_layers: int = field(default=2, metadata={"help": "LSTM layers (the MLP always has 3 linear layers)."})
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout between LSTM layers."})

    def __post_init__(self) -> None:
        self.peft_type = PeftType.P_TUNING
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(str(kind).upper())
        except ValueError:
            raise ValueError(f"encoder_reparameterization_type must be MLP or LSTM, got {kind!r}.") from None
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}.")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}.")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}.")

    def build_prompt_module(self, model: nn.Module, word_embeddings: nn.Embedding, table: bool) -> PromptModule:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
        if table:
            return PromptModule(self.total_virtual_tokens, self.token_dim)
        return PTuningEncoder(self)


class PTuningEncoder(PromptModule):
    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__(config.total_virtual_tokens, config.token_dim)
        d, h = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=float(config.encoder_dropout), bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            if config.encoder_num_layers != 2:
                logger.warning("encoder_num_layers is ignored by the MLP prompt encoder (it has 3 linear layers).")
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    @property
    def is_table(self) -> bool:
        return False

    def encode(self, table: torch.Tensor) -> torch.Tensor:
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            return self.mlp_head(self.lstm_head(table.unsqueeze(0))[0])[0]
        return self.mlp_head(table)


P_TUNING = register_method(
    MethodSpec(
        peft_type=PeftType.P_TUNING.value,
        config_cls=PromptEncoderConfig,
        create_layer=lambda *a, **k: None,
        prefix="prompt_encoder.",
        model_cls=PromptLearningModel,
        supports_mixed_batch=False,
        supports_merge=False,
    )
)
