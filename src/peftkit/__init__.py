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
from peftkit.methods.adapters.bottleneck import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from peftkit.methods.adapters.compacter import CompacterConfig, CompacterPlusPlusConfig
from peftkit.methods.adapters.ia3 import IA3Config, IA3Model
from peftkit.methods.adapters.ln_tuning import LNTuningConfig, LNTuningModel
from peftkit.methods.adapters.bitfit import BitFitConfig, BitFitModel
from peftkit.methods.prompts.prompt_tuning import PromptTuningConfig, PromptTuningInit
from peftkit.methods.prompts.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from peftkit.methods.prompts.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftkit.methods.prompts.llama_adapter import AdaptionPromptConfig, AdaptionPromptModel
from peftkit.engine.prompting import PromptLearningConfig, PromptLearningModel
from peftkit.methods.hybrids.mam import MAMConfig
from peftkit.methods.hybrids.unipelt import UniPELTConfig
from peftkit.methods.hybrids.ah_prefix import AdapterHubPrefixTuningConfig
from peftkit.engine.hybrid import HybridConfig, HybridModel
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
from peftkit.engine.functional import (
    NoMatchingPeftModuleError,
    TunerLayerStatus,
    TunerModelStatus,
    get_base_model_state_dict,
    get_layer_status,
    get_model_status,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.methods.lora.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
from peftkit.methods.lora.hotswap import prepare_model_for_compiled_hotswap
from peftkit.methods.lora.loftq import LoftQConfig
from peftkit.methods.lora.loraplus import create_loraplus_optimizer
from peftkit.engine.mixed import PeftMixedModel
from peftkit.methods.lora.lorafa import LoraFAOptimizer, create_lorafa_optimizer
from peftkit.integrations import PeftkitCallback
from peftkit.integrations.quantization import prepare_model_for_kbit_training
from peftkit.engine.warnings import PeftWarning  # PEFT 0.21 LoRA features (f17a)
from peftkit.methods.lora.param_wrapper import ParamWrapper
from peftkit.methods.lora.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper

__version__ = "0.1.0"

__all__ = [
    "BnConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "DoubleSeqBnConfig",
    "ParBnConfig",
    "SeqBnConfig",
    "AdaLoraCallback",
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
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
    "PeftkitCallback",
    "PeftType",
    "PrefixEncoder",
    "MAMConfig",
    "UniPELTConfig",
    "AdapterHubPrefixTuningConfig",
    "HybridConfig",
    "HybridModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptLearningModel",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "XLoraConfig",
    "IA3Config",
    "IA3Model",
    "LNTuningConfig",
    "LNTuningModel",
    "BitFitConfig",
    "BitFitModel",
    "XLoraModel",
    "get_adapter_state_dict",
    "get_peft_model",
    "set_adapter_state_dict",
    "prepare_model_for_kbit_training",
    "supported_methods",
    # PEFT's functional API (engine/functional.py)
    "NoMatchingPeftModuleError",
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
    "set_base_model_state_dict",
    "create_loraplus_optimizer",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    # PEFT 0.21 LoRA features (f17a)
    "PeftWarning",
    "ParamWrapper",
    "TrainableTokensLayer",
    "TrainableTokensWrapper",
    "PeftMixedModel",
    "LoraFAOptimizer",
    "create_lorafa_optimizer",
    "prepare_model_for_compiled_hotswap",
    "LoftQConfig",
]
