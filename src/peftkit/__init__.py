"""peftkit: parameter-efficient fine-tuning for PyTorch and Hugging Face transformers.

The API follows Hugging Face PEFT (same class and field names); checkpoints are interchangeable with it.
"""

from .config import PeftConfig, PeftType, TaskType
from .mapping import get_peft_model
from .methods.adalora import AdaLoraCallback, AdaLoraConfig, AdaLoraModel, attach_to_optimizer
from .methods.lora import LoraConfig, LoraModel
from .methods.loha import LoHaConfig
from .methods.lokr import KronAConfig, LoKrConfig
from .methods.miss import MissConfig
from .methods.xlora import XLoraConfig, XLoraModel
from .methods.oft import OFTConfig
from .methods.boft import BOFTConfig
from .methods.hra import HRAConfig, HRAModel
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .registry import supported_methods
from .save_load import get_adapter_state_dict, set_adapter_state_dict

__version__ = "0.1.0"

__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraModel",
    "attach_to_optimizer",
    "KronAConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MissConfig",
    "LoraModel",
    "OFTConfig",
    "BOFTConfig",
    "HRAConfig",
    "HRAModel",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "XLoraConfig",
    "XLoraModel",
    "get_adapter_state_dict",
    "get_peft_model",
    "set_adapter_state_dict",
    "supported_methods",
]
