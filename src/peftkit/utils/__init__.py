"""Hugging Face PEFT's ``peft.utils`` names, as peftkit's objects: the method and task enums, the adapter
state-dict functions, the ``modules_to_save`` wrapper and the module-tree helper ``_get_submodules``.

``AuxiliaryTrainingWrapper`` (PEFT's base of its trainable-copy wrappers) is peftkit's
:class:`~peftkit.engine.layer.ModulesToSaveWrapper`, the one such wrapper peftkit has.
"""

from peftkit.engine.config import PeftType, TaskType
from peftkit.engine.functional import get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.engine.layer import ModulesToSaveWrapper
from peftkit.engine.layer import ModulesToSaveWrapper as AuxiliaryTrainingWrapper
from peftkit.engine.config import CONFIG_NAME
from peftkit.engine.io import LEGACY_WEIGHTS_NAME as WEIGHTS_NAME
from peftkit.engine.io import SAFETENSORS_NAME as SAFETENSORS_WEIGHTS_NAME
from peftkit.tuners.tuners_utils import _get_submodules, check_target_module_exists

__all__ = [
    "AuxiliaryTrainingWrapper",
    "CONFIG_NAME",
    "ModulesToSaveWrapper",
    "PeftType",
    "SAFETENSORS_WEIGHTS_NAME",
    "TaskType",
    "WEIGHTS_NAME",
    "_get_submodules",
    "check_target_module_exists",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
]
