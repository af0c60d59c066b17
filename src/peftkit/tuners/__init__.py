"""Hugging Face PEFT's ``peft.tuners`` package paths, holding peftkit's own classes.

Code written for PEFT imports from these paths (``from peft.tuners.tuners_utils import BaseTunerLayer``,
``from peft.tuners.lora import LoraLayer``); with ``peftkit`` in PEFT's place the same imports give peftkit's
classes, so ``isinstance`` checks find peftkit's layers. Only what peftkit implements is here.
"""

from peftkit.tuners import lora, tuners_utils  # noqa: F401
from peftkit.tuners.lora import LoraConfig, LoraModel
from peftkit.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peftkit.methods.lora.adalora import AdaLoraConfig, AdaLoraModel
from peftkit.methods.lycoris.loha import LoHaConfig
from peftkit.methods.lycoris.lokr import LoKrConfig
from peftkit.methods.lycoris.miss import MissConfig
from peftkit.methods.lora.xlora import XLoraConfig, XLoraModel
from peftkit.methods.orthogonal.oft import OFTConfig
from peftkit.methods.orthogonal.boft import BOFTConfig
from peftkit.methods.orthogonal.hra import HRAConfig, HRAModel
from peftkit.methods.adapters.ia3 import IA3Config, IA3Model
from peftkit.methods.adapters.ln_tuning import LNTuningConfig, LNTuningModel
from peftkit.methods.prompts.prompt_tuning import PromptTuningConfig, PromptTuningInit
from peftkit.methods.prompts.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from peftkit.methods.prompts.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from peftkit.methods.prompts.llama_adapter import AdaptionPromptConfig, AdaptionPromptModel

__all__ = [
    "AdaLoraConfig", "AdaLoraModel", "AdaptionPromptConfig", "AdaptionPromptModel", "BOFTConfig", "BaseTuner",
    "BaseTunerLayer", "HRAConfig", "HRAModel", "IA3Config", "IA3Model", "LNTuningConfig", "LNTuningModel",
    "LoHaConfig", "LoKrConfig", "LoraConfig", "LoraModel", "MissConfig", "OFTConfig", "PrefixEncoder",
    "PrefixTuningConfig", "PromptEncoderConfig", "PromptEncoderReparameterizationType", "PromptTuningConfig",
    "PromptTuningInit", "XLoraConfig", "XLoraModel",
]
