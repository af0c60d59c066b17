"""peftkit: parameter-efficient fine-tuning for PyTorch and Hugging Face transformers.

The API follows Hugging Face PEFT (same class and field names); checkpoints are interchangeable with it.
"""

from peftkit import methods  # noqa: F401  (importing it registers every method)
from peftkit.engine.config import PeftConfig, PeftType, TaskType
from peftkit.engine.mapping import get_peft_model
from peftkit.methods.lora.adalora import AdaLoraCallback, AdaLoraConfig, AdaLoraModel, attach_to_optimizer
from peftkit.methods.lora.lora import LoraConfig, LoraModel
from peftkit.methods.lycoris.loha import LoHaConfig
from peftkit.methods.lycoris.lokr import KronAConfig, LoKrConfig
from peftkit.methods.lycoris.miss import MissConfig
from peftkit.methods.lora.xlora import XLoraConfig, XLoraModel
from peftkit.methods.orthogonal.oft import OFTConfig
from peftkit.methods.orthogonal.boft import BOFTConfig
from peftkit.methods.orthogonal.hra import HRAConfig, HRAModel
from peftkit.engine.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from peftkit.engine.registry import supported_methods
from peftkit.engine.save_load import get_adapter_state_dict, set_adapter_state_dict
from peftkit.integrations.quantization import prepare_model_for_kbit_training

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
    "prepare_model_for_kbit_training",
    "supported_methods",
]
