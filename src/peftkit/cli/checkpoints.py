"""``peftkit inspect`` and ``peftkit merge``: read adapter folders written by peftkit or Hugging Face PEFT."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Optional

from peftkit.engine.config import CONFIG_NAME
from peftkit.engine.io import LEGACY_WEIGHTS_NAME, SAFETENSORS_NAME
from peftkit.cli.method_defaults import UsageError
from peftkit.engine.save_load import CHECKPOINT_PREFIX

# Config fields that describe a method's size, reported by inspect when present.
RANK_FIELDS = ("r", "lora_alpha", "alpha", "init_r", "target_r", "rank_pattern", "alpha_pattern", "oft_block_size",
               "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "num_virtual_tokens", "use_dora",
               "use_rslora", "decompose_both", "decompose_factor")
HEAD_KEYS = ("classifier.weight", "score.weight", "classifier.out_proj.weight", "qa_outputs.weight")


def _tensor_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) without loading the tensors (safetensors header) or, for .bin, loading safely."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        with safe_open(path, framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                out[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        return out
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()}


def _adapter_dirs(path: str, usage: str = "peftkit inspect ADAPTER_FOLDER") -> dict[str, str]:
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a folder"
        raise UsageError(f"the adapter folder {path} {what}; {usage} takes a folder with {CONFIG_NAME} and "
                         f"{SAFETENSORS_NAME} (what peftkit train --out or save_pretrained writes).")
    found = {}
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        found["default"] = path
    for entry in sorted(os.listdir(path)):
        sub = os.path.join(path, entry)
        if os.path.isdir(sub) and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            found[entry] = sub
    if not found:
        raise UsageError(f"No {CONFIG_NAME} in {path} or its sub-folders: it is not an adapter checkpoint "
                         f"(it holds: {', '.join(sorted(os.listdir(path))) or 'nothing'}).")
    return found


def _prefix_for(peft_type: str) -> Optional[str]:
    from peftkit.engine.registry import get_method

    try:
        return get_method(peft_type).prefix
    except ValueError:
        return None  # a PEFT method this version does not implement: still describable from names and shapes


def describe_adapter(folder: str) -> dict[str, Any]:
    """Method, base model, targets, ranks, parameter count and size of the adapter in ``folder``."""
    from peftkit.engine.adapterhub import is_adapterhub_folder

    if is_adapterhub_folder(folder):
        return describe_adapterhub_folder(folder)
    with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as fh:
        config = json.load(fh)
    weights = next((os.path.join(folder, n) for n in (SAFETENSORS_NAME, LEGACY_WEIGHTS_NAME)
                    if os.path.isfile(os.path.join(folder, n))), None)
    if weights is None:
        raise UsageError(f"{folder} has {CONFIG_NAME} but no {SAFETENSORS_NAME} (or {LEGACY_WEIGHTS_NAME}).")
    shapes = _tensor_shapes(weights)
    peft_type = str(config.get("peft_type"))
    prefix = _prefix_for(peft_type)
    modules: dict[str, int] = {}
    saved_modules: dict[str, int] = {}
    ranks: Counter = Counter()
    dtypes: Counter = Counter()
    for key, (shape, dtype) in shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        dtypes[dtype] += numel
        if key == "prompt_embeddings":  # prompt-learning methods: the whole prompt is one tensor
            modules["(prompt)"] = numel
            continue
        if not key.startswith(CHECKPOINT_PREFIX) and key.startswith("base_model."):  # their modules_to_save copies
            key = CHECKPOINT_PREFIX + key[len("base_model."):]
        parts = (key[len(CHECKPOINT_PREFIX):] if key.startswith(CHECKPOINT_PREFIX) else key).split(".")
        idx = next((i for i, p in enumerate(parts) if prefix and p.startswith(prefix)), None)
        if idx is None:  # a modules_to_save copy or a trained bias: stored under the plain module path
            saved_modules[".".join(parts[:-1])] = saved_modules.get(".".join(parts[:-1]), 0) + numel
            continue
        module = ".".join(parts[:idx])
        modules[module] = modules.get(module, 0) + numel
        if parts[idx] in ("lora_A", "lora_embedding_A") and len(shape) >= 1:
            ranks[shape[0]] += 1  # LoRA's A is r x in (or r x in/groups x k... for conv); embedding A is r x vocab
    total = sum(modules.values()) + sum(saved_modules.values())
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in (CONFIG_NAME, os.path.basename(weights)))
    return {
        "folder": folder,
        "method": peft_type,
        "implemented_here": prefix is not None,
        "task_type": config.get("task_type"),
        "base_model": config.get("base_model_name_or_path"),
        "target_modules": config.get("target_modules"),
        "adapted_modules": len(modules),
        "adapted_module_names": sorted(modules),
        "modules_to_save": sorted(saved_modules),
        "rank_config": {k: config[k] for k in RANK_FIELDS if k in config and config[k] not in (None, {}, [])},
        "ranks_from_shapes": {str(r): n for r, n in sorted(ranks.items())},
        "parameters": total,
        "adapter_parameters": sum(modules.values()),
        "saved_module_parameters": sum(saved_modules.values()),
        "dtypes": dict(dtypes),
        "weights_file": os.path.basename(weights),
        "size_bytes": size,
        "written_by": "peft " + str(config["peft_version"]) if config.get("peft_version") else "peftkit or peft",
    }


def describe_adapterhub_folder(folder: str) -> dict[str, Any]:
    """``describe_adapter`` for a folder written by AdapterHub's ``adapters`` (``save_adapter``)."""
    from peftkit.engine import adapterhub

    info = adapterhub.describe(folder)
    weights = adapterhub.weights_file(folder)
    shapes = _tensor_shapes(weights)
    modules: dict[str, int] = {}
    dtypes: Counter = Counter()
    for key, (shape, dtype) in shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        dtypes[dtype] += numel
        module = key.split(".adapters.", 1)[0] if ".adapters." in key else key.rsplit(".", 1)[0]
        modules[module] = modules.get(module, 0) + numel
    cfg = info["config"]
    sizes = ("reduction_factor", "non_linearity", "mh_adapter", "output_adapter", "cross_adapter", "is_parallel",
             "scaling", "phm_layer", "phm_dim", "phm_rank", "prefix_length", "r", "alpha")
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in (CONFIG_NAME, os.path.basename(weights)))
    return {
        "folder": folder,
        "format": "adapterhub",
        "method": f"AdapterHub {info['architecture']}",
        "implemented_here": not cfg.get("architecture"),
        "task_type": None,
        "base_model": f"{info['model_class']} ({info['model_type']})",
        "target_modules": None,
        "adapted_modules": len(modules),
        "adapted_module_names": sorted(modules),
        "modules_to_save": [],
        "rank_config": {k: cfg[k] for k in sizes if k in cfg and cfg[k] not in (None, {}, [])},
        "ranks_from_shapes": {},
        "parameters": info["parameters"],
        "adapter_parameters": info["parameters"],
        "saved_module_parameters": 0,
        "dtypes": dict(dtypes),
        "weights_file": os.path.basename(weights),
        "size_bytes": size,
        "written_by": str(info["version"]),
    }


def describe_checkpoint(path: str) -> dict[str, Any]:
    return {"path": path, "adapters": {name: describe_adapter(d) for name, d in _adapter_dirs(path).items()}}


def _short_list(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def format_description(info: dict[str, Any]) -> str:
    lines = []
    for name, a in info["adapters"].items():
        lines.append(f"adapter {name!r} in {a['folder']}")
        lines.append(f"  method:          {a['method']}" + ("" if a["implemented_here"] else " (not implemented in this peftkit)"))
        lines.append(f"  task type:       {a['task_type']}")
        lines.append(f"  base model:      {a['base_model']}")
        lines.append(f"  target_modules:  {a['target_modules']}")
        lines.append(f"  adapted modules: {a['adapted_modules']} ({_short_list(a['adapted_module_names'], 3)})")
        if a["modules_to_save"]:
            lines.append(f"  trained copies:  {', '.join(a['modules_to_save'])} ({a['saved_module_parameters']:,d} params)")
        if a["rank_config"]:
            lines.append("  size settings:   " + ", ".join(f"{k}={v}" for k, v in a["rank_config"].items()))
        if a["ranks_from_shapes"]:
            lines.append("  ranks (tensors): " + ", ".join(f"r={r} x{n}" for r, n in a["ranks_from_shapes"].items()))
        lines.append(f"  parameters:      {a['parameters']:,d} (adapter {a['adapter_parameters']:,d})")
        lines.append("  dtypes:          " + ", ".join(f"{d} ({n:,d})" for d, n in a["dtypes"].items()))
        lines.append(f"  size on disk:    {a['size_bytes']:,d} bytes ({a['weights_file']} + {CONFIG_NAME})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- merge
_TASK_TO_AUTO = {
    "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}


def load_base_for_adapter(base: str, adapter: str) -> tuple[Any, Optional[Any]]:
    """The base model in the class its adapter's task needs (label count read from the saved head), and its
    tokenizer when the base has one."""
    import transformers

    from peftkit.engine.config import PeftConfig

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = PeftConfig.from_pretrained(adapter)
    from peftkit.cli.train import DEFAULT_MODEL_NAMES, default_model_path

    if base in DEFAULT_MODEL_NAMES:  # the embedded copy (also for the hub id peftkit train records)
        base = default_model_path()
    auto = getattr(transformers, _TASK_TO_AUTO.get(str(config.task_type), "AutoModel"))
    kwargs: dict[str, Any] = {"local_files_only": os.path.isdir(base)}
    if str(config.task_type) in ("SEQ_CLS", "TOKEN_CLS"):
        from peftkit.engine.io import resolve_weights_file

        shapes = _tensor_shapes(resolve_weights_file(adapter))
        for key, (shape, _) in shapes.items():
            if key.endswith(HEAD_KEYS):
                kwargs["num_labels"] = shape[0]
                break
    try:
        model = auto.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"Cannot load the base model {base} ({exc}).") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base, local_files_only=os.path.isdir(base))
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def merge_adapter_folder(base: str, adapter: str, out: str, dtype: Optional[str] = None, safe_merge: bool = True) -> str:
    """Load ``adapter`` onto ``base``, fold it into the weights and save a plain transformers folder at ``out``."""
    import torch

    from peftkit.engine.peft_model import PeftModel

    _adapter_dirs(adapter, "peftkit merge BASE ADAPTER OUT: ADAPTER")
    if not os.path.isdir(base) and (base.startswith((".", "/", "~")) or os.path.isabs(base)):
        raise UsageError(f"the base model folder {base} does not exist; peftkit merge BASE ADAPTER OUT: BASE is a "
                         "transformers folder, a hub id, or 'default' (the embedded all-MiniLM-L6-v2).")
    model, tokenizer = load_base_for_adapter(base, adapter)
    peft_model = PeftModel.from_pretrained(model, adapter)
    if not peft_model.base_model.method.supports_merge:
        raise UsageError(f"{peft_model.peft_type} adapters cannot be merged into the base weights; serve them "
                         "with PeftModel.from_pretrained instead.")
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    if dtype is not None:
        merged = merged.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    results = os.path.join(adapter, "train_results.json")
    if os.path.isfile(results):  # label names from peftkit train
        with open(results, encoding="utf-8") as fh:
            names = json.load(fh).get("label_names")
        if names and len(names) == getattr(merged.config, "num_labels", -1):
            merged.config.id2label = {i: str(n) for i, n in enumerate(names)}
            merged.config.label2id = {str(n): i for i, n in enumerate(names)}
    merged.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
