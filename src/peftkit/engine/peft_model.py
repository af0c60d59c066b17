"""The user-facing model: :class:`PeftModel` and its task-specific subclasses."""

from __future__ import annotations

import copy
import inspect
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from peftkit.engine.config import PeftConfig, TaskType
from peftkit.engine.io import SAFETENSORS_NAME, load_tensors, resolve_weights_file, save_tensors
from peftkit.engine.layer import BASE_ADAPTER, mixed_batch
from peftkit.engine.registry import method_for_config
from peftkit.engine.save_load import get_adapter_state_dict, set_adapter_state_dict
from peftkit.engine.tuner import AdapterModel
from peftkit.integrations.distributed import any_sharded, is_writer

SEQ_CLS_HEAD_NAMES = ("classifier", "score")


class _BoundForward:
    """``peft_model.forward``: calls :meth:`PeftModel._forward`; its signature is the wrapped model's forward
    signature plus ``adapter_names``. ``transformers.Trainer`` keeps only the dataset columns that
    ``inspect.signature(model.forward)`` names (it looks through Hugging Face PEFT's classes, not ours)."""

    __slots__ = ("_fn", "_model")

    def __init__(self, fn: Any, model: "PeftModel") -> None:
        self._fn, self._model = fn, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self._model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            inner = inspect.signature(self._model.base_model.model.forward)
        except (TypeError, ValueError):
            inner = inspect.signature(self._fn)
            inner = inner.replace(parameters=list(inner.parameters.values())[1:])
        params = list(inner.parameters.values())
        if "adapter_names" not in inner.parameters:
            extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
            at = next((i for i, q in enumerate(params) if q.kind == inspect.Parameter.VAR_KEYWORD), len(params))
            params.insert(at, extra)
        return inner.replace(parameters=params)


class _Forward:
    """Descriptor for ``PeftModel.forward``. On an instance: a :class:`_BoundForward`. On the class: a callable whose
    signature names the task's label arguments (``transformers.utils.find_labels`` reads ``type(model).forward``)."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, instance: Optional["PeftModel"], owner: type) -> Any:
        if instance is not None:
            return _BoundForward(self._fn, instance)
        fn = self._fn

        def forward(self_: "PeftModel", *args: Any, **kwargs: Any) -> Any:
            return fn(self_, *args, **kwargs)

        kind = inspect.Parameter
        params = [kind("self", kind.POSITIONAL_OR_KEYWORD), kind("args", kind.VAR_POSITIONAL)]
        params += [kind(name, kind.KEYWORD_ONLY, default=None) for name in getattr(owner, "_label_names", ())]
        params += [kind("adapter_names", kind.KEYWORD_ONLY, default=None), kind("kwargs", kind.VAR_KEYWORD)]
        forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        forward.__doc__ = fn.__doc__
        return forward


def _adapter_model_for(model: nn.Module, config: PeftConfig, adapter_name: str, loading: bool) -> AdapterModel:
    spec = method_for_config(config)
    cls = spec.model_cls or AdapterModel
    return cls(model, config, adapter_name, loading=loading)


class PeftModel(nn.Module):
    """A base model with named adapters. Forwards like the base model.

    Attributes:
        base_model: the engine (:class:`~peftkit.engine.tuner.AdapterModel`); ``base_model.model`` is the user's model.
    """

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", *, _loading: bool = False, **_: Any
    ) -> None:
        super().__init__()
        peft_config = copy.deepcopy(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(
                getattr(model, "config", None), "_name_or_path", None
            ) or None
        self._prepare_config(model, peft_config)
        self.base_model = _adapter_model_for(model, peft_config, adapter_name, _loading)

    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> None:
        """Task-specific adjustments of a config before injection (subclasses)."""

    # --------------------------------------------------------------------------------------------- delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def peft_type(self) -> str:
        return str(next(iter(self.peft_config.values())).peft_type)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def _check_adapter_names(self, adapter_names: Optional[Sequence[str]]) -> None:
        if adapter_names is None:
            return
        if not self.base_model.method.supports_mixed_batch:
            raise ValueError(f"{self.peft_type} does not support adapter_names= (one adapter per row).")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names names unknown adapters {unknown}; known: {', '.join(self.peft_config)} "
                f"(and {BASE_ADAPTER!r} for no adapter)."
            )

    def _forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; ``adapter_names`` (one per row, ``"__base__"`` for none) mixes adapters."""
        self._check_adapter_names(adapter_names)
        with mixed_batch(self.base_model.model, adapter_names):
            return self.base_model(*args, **kwargs)

    forward = _Forward(_forward)
    # What transformers.Trainer treats as labels (see _Forward). Without a task type the wrapped class is unknown
    # here; "labels" is what transformers models take.
    _label_names: tuple[str, ...] = ("labels",)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        self._check_adapter_names(adapter_names)
        with mixed_batch(self.base_model.model, adapter_names, expandable=True):
            return self.base_model.model.generate(*args, **kwargs)

    # ----------------------------------------------------------------------------------------- parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = 0, 0
        for p in self.parameters():
            n = p.numel()
            if n == 0 and hasattr(p, "ds_numel"):
                n = p.ds_numel
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # ------------------------------------------------------------------------------------------- adapters
    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False, *, _loading: bool = False
    ) -> None:
        peft_config = copy.deepcopy(peft_config)
        first = next(iter(self.peft_config.values()), None)  # None after every adapter was deleted
        if peft_config.base_model_name_or_path is None and first is not None:
            peft_config.base_model_name_or_path = first.base_model_name_or_path
        self._prepare_config(self.base_model.model, peft_config)
        self.base_model.inject_adapter(adapter_name, peft_config, loading=_loading)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter():`` runs the plain base model."""
        with self.base_model.adapters_disabled():
            yield

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None
    ) -> nn.Module:
        return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ----------------------------------------------------------------------------------------- save / load
    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        selected_adapters: Optional[Sequence[str]] = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        **_: Any,
    ) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` per adapter ("default" in the folder's
        root, any other in a sub-folder of its name). Each file is written atomically."""
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"No adapter named {n!r} to save; this model has: {', '.join(self.peft_config)}.")
        # Sharded parameters (FSDP2, ZeRO-3): every rank takes part in gathering them; rank 0 writes.
        sharded = any_sharded(self.parameters())
        if not is_main_process and not sharded:
            return
        write = is_main_process and (not sharded or is_writer())
        for name in names:
            tensors = get_adapter_state_dict(self.base_model, name)
            if not write:
                continue
            out_dir = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out_dir, exist_ok=True)
            save_tensors(tensors, os.path.join(out_dir, SAFETENSORS_NAME))
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(out_dir)

    def load_adapter(
        self,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        subfolder: Optional[str] = None,
        **hub_kwargs: Any,
    ) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name.")
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
        config.inference_mode = not is_trainable
        weights = load_tensors(resolve_weights_file(model_id, subfolder=subfolder, **hub_kwargs))
        self.add_adapter(adapter_name, config, _loading=True)
        try:
            set_adapter_state_dict(self.base_model, weights, adapter_name)
        except Exception:
            self.base_model._discard_partial_adapter(adapter_name)  # the model is left as it was
            raise
        if not is_trainable:
            for _, layer in self.base_model.adapter_layers():
                for _, p in layer.adapter_parameters(adapter_name):
                    p.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        subfolder: Optional[str] = None,
        **hub_kwargs: Any,
    ) -> "PeftModel":
        """Load an adapter saved by peftkit or Hugging Face PEFT onto ``model`` (local folder or hub id)."""
        if isinstance(model, PeftModel):
            raise ValueError("The model already is a PeftModel; use model.load_adapter(path, adapter_name) to add one.")
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
        config.inference_mode = not is_trainable
        weights = load_tensors(resolve_weights_file(model_id, subfolder=subfolder, **hub_kwargs))
        target_cls = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL.get(str(config.task_type), PeftModel)
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        peft_model = target_cls(model, config, adapter_name, _loading=True)
        try:
            set_adapter_state_dict(peft_model.base_model, weights, adapter_name)
        except Exception:
            # A checkpoint that does not fit leaves the user's model as it was: unwrapped, flags restored.
            peft_model.base_model._discard_partial_adapter(adapter_name)
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            raise
        if not is_trainable:
            for p in peft_model.parameters():
                p.requires_grad_(False)
            peft_model.eval()
        return peft_model


class PeftModelForSequenceClassification(PeftModel):
    """Also trains and saves the classification head (``classifier`` or ``score``), as PEFT does."""

    _label_names = ("labels",)

    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> None:
        if not hasattr(config, "modules_to_save"):
            return
        present = [n for n in SEQ_CLS_HEAD_NAMES if any(name == n or name.endswith("." + n) for name, _ in model.named_modules())]
        if not present:
            return
        merged = list(config.modules_to_save or [])
        merged += [n for n in present if n not in merged]
        config.modules_to_save = merged


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    pass


class PeftModelForQuestionAnswering(PeftModel):
    _label_names = ("start_positions", "end_positions")

    def _prepare_config(self, model: nn.Module, config: PeftConfig) -> None:
        if hasattr(config, "modules_to_save") and any(n.endswith("qa_outputs") for n, _ in model.named_modules()):
            merged = list(config.modules_to_save or [])
            if "qa_outputs" not in merged:
                merged.append("qa_outputs")
            config.modules_to_save = merged


class PeftModelForCausalLM(PeftModel):
    _label_names = ("labels",)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model.prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModelForCausalLM):
    pass


class PeftModelForFeatureExtraction(PeftModel):
    pass


MODEL_TYPE_TO_PEFT_MODEL: dict[str, type] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
