"""Configuration base classes shared by every method.

A method's config is a dataclass that subclasses :class:`PeftConfig`. Field names follow Hugging Face PEFT so
that ``adapter_config.json`` files move between the two libraries unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from peftkit.engine.io import atomic_write_text
from peftkit.integrations import peft_compat as _peft_compat

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
# The Hugging Face PEFT release whose checkpoint format peftkit writes (and is tested against), plus who wrote it;
# PEFT reads the part before '@' as a version (e.g. to tell old OFT parameterisations from new ones).
PEFT_FORMAT_VERSION = "0.21.2@peftkit"


class PeftType(str, enum.Enum):
    """Names of the methods, as written in ``adapter_config.json`` under ``peft_type``."""

    LORA = "LORA"
    LOHA = "LOHA"
    LOKR = "LOKR"
    ADALORA = "ADALORA"
    OFT = "OFT"
    BOFT = "BOFT"
    HRA = "HRA"
    MISS = "MISS"
    XLORA = "XLORA"
    IA3 = "IA3"
    LN_TUNING = "LN_TUNING"
    BITFIT = "BITFIT"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    BOTTLENECK = "BOTTLENECK"  # AdapterHub's bottleneck family: SeqBn, DoubleSeqBn, ParBn, Compacter(++)
    MAM = "MAM"  # hybrids (AdapterHub): prefix + parallel adapter
    UNIPELT = "UNIPELT"  # hybrids (AdapterHub): gated prefix + bottleneck adapter + LoRA
    ADAPTERHUB_PREFIX_TUNING = "ADAPTERHUB_PREFIX_TUNING"  # AdapterHub's prefix tuning (its folders)

    def __str__(self) -> str:  # json.dumps writes the value, str() too
        return self.value


class TaskType(str, enum.Enum):
    """The task a model is fine-tuned for; chooses the :class:`PeftModel` subclass."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


# Keys that Hugging Face PEFT writes into adapter_config.json for features we do not have, with the value that
# means "feature unused" (None: any value is harmless). Other unknown keys are dropped silently when their value
# is empty/None/False, and with one warning otherwise.
_FOREIGN_KEY_DEFAULTS: dict[str, Any] = {
    "peft_version": None,
    "auto_mapping": None,
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
}


def _is_unused_value(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclass
class PeftConfig:
    """Fields every method shares.

    Subclasses set ``peft_type`` as a class-level default and add their own fields. ``__post_init__`` of a
    subclass should call ``super().__post_init__()`` and validate its own fields with messages that say what to do.
    """

    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "The method's name."})
    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "The task, e.g. CAUSAL_LM."})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Base model id or path."})
    revision: Optional[str] = field(default=None, metadata={"help": "Base model revision on the hub."})
    inference_mode: bool = field(default=False, metadata={"help": "If True, adapters are frozen."})
    peft_version: Optional[str] = field(
        default=None,
        metadata={"help": "Version of the PEFT checkpoint format; filled in automatically (see PEFT_FORMAT_VERSION)."},
    )

    # Methods that are not prompt-learning methods share how targets are chosen; they inherit these fields
    # through TargetedConfig below.
    is_prompt_learning: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        if self.peft_type is not None and not isinstance(self.peft_type, PeftType):
            self.peft_type = PeftType(str(self.peft_type).upper())
        if self.task_type is not None and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(str(self.task_type).upper())
            except ValueError:
                valid = ", ".join(t.value for t in TaskType)
                raise ValueError(f"Unknown task_type {self.task_type!r}; use one of: {valid}.") from None
        from peftkit.engine.validation import validate_config

        validate_config(self)  # every field's type and range, named, before any method-specific check

    # isinstance(config, peft.PeftConfig) holds while peft is imported (TRL, transformers' add_adapter check it);
    # type() stays this class. See peftkit.integrations.peft_compat.
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        return _peft_compat.config_bridge(type(self))

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _peft_compat.reduce_ex(self, protocol)

    # ----------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build the config of the method named by ``data["peft_type"]`` (or of ``cls`` when called on a subclass).

        Keys this library does not know are dropped; a warning lists those whose value means a feature is in use.
        """
        data = dict(data)
        target_cls = cls
        if cls is PeftConfig or cls is TargetedConfig:
            peft_type = data.get("peft_type")
            if peft_type is None:
                raise ValueError("adapter_config.json has no 'peft_type'; cannot tell which method it describes.")
            from peftkit.engine.registry import get_method

            target_cls = get_method(peft_type).config_cls
        known = {f.name for f in dataclasses.fields(target_cls)}
        unknown = {k: v for k, v in data.items() if k not in known}
        noisy = sorted(
            k
            for k, v in unknown.items()
            if not _is_unused_value(v)
            and not (k in _FOREIGN_KEY_DEFAULTS and _FOREIGN_KEY_DEFAULTS[k] in (None, v))
        )
        if noisy:
            logger.warning(
                "Ignoring adapter_config.json keys that %s does not support: %s. The adapter may behave differently "
                "from the library that wrote it.", target_cls.__name__, ", ".join(noisy)
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        return target_cls(**kwargs)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text + "\n")

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> dict[str, Any]:
        """The raw contents of a config file, as a dict (as in PEFT); :meth:`from_dict` builds the config. Anything
        but a JSON object gets an error naming the file."""
        from peftkit.engine.io import read_config_file

        return read_config_file(path)

    @classmethod
    def from_file_data(cls, data: dict[str, Any], path: Union[str, os.PathLike]) -> "PeftConfig":
        """:meth:`from_dict` of the parsed file ``path``; a bad value gets an error that names the file too."""
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{os.fspath(path)}: {exc}") from exc

    @classmethod
    def from_pretrained(
        cls, name_or_path: Union[str, os.PathLike], subfolder: Optional[str] = None, **hub_kwargs: Any
    ) -> "PeftConfig":
        from peftkit.engine.io import resolve_file

        path = resolve_file(name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        data = cls.from_json_file(path)
        # As PEFT: the folder's own method decides the class, whichever config class this is called on
        # (LoraConfig.from_pretrained(<a LoHa folder>) gives a LoHaConfig); a subclass of it is kept.
        target_cls = cls
        if data.get("peft_type") is not None:
            from peftkit.engine.registry import get_method

            real = get_method(data["peft_type"]).config_cls
            from peftkit.engine.registry import supported_methods

            # another method's own config class (AdaLoraConfig subclasses LoraConfig) is not "a subclass of it"
            other_method = any(get_method(m).config_cls is cls for m in supported_methods()) and cls is not real
            if not issubclass(cls, real) or other_method:
                target_cls = real
        return target_cls.from_file_data(data, path)


def _targeted_rules() -> dict[str, Any]:
    from peftkit.engine.validation import Rule

    return {
        "target_modules": Rule(regex=True),
        "exclude_modules": Rule(regex=True),
        "layers_pattern": Rule(regex=True, each=Rule(regex=True)),
        "layers_to_transform": Rule(min=0, each=Rule(min=0)),
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, tuple)):
        return list(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"Cannot write {type(value).__name__} to adapter_config.json")


@dataclass
class TargetedConfig(PeftConfig):
    """Fields of methods that attach to chosen modules of the model (every method but prompt learning)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules to adapt: a list of name suffixes ('q_proj'), a regex matched against the full module "
            "name, or 'all-linear' (every linear layer but the output head)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to adapt: same forms as target_modules."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt modules in these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h') used with layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules (e.g. a classifier head) trained in full and saved with the adapter."}
    )

    # Range rules of the checks in peftkit.engine.validation (types come from the annotations).
    field_rules: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern only has a meaning together with layers_to_transform; set both.")
        if isinstance(self.target_modules, str) and self.layers_to_transform:
            raise ValueError(
                "layers_to_transform cannot be combined with a regex target_modules; put the layer indices into "
                "the regex instead."
            )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)


TargetedConfig.field_rules = _targeted_rules()
