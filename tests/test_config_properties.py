"""Property-based tests (hypothesis) over every config class of every registered method.

For any values of a few fields (drawn from each field's type and from a pool of hostile values: wrong types,
NaN/inf, huge, negative, empty, bad regexes), either the config or ``get_peft_model`` raises a ValueError/TypeError
that names one of those fields, or the model works: finite outputs, save/load reproduces the outputs exactly, and
merge/unmerge round-trips (merged output = unmerged output, unmerge restores the base weights).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import typing

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import peftkit  # noqa: E402
from models import MODELS  # noqa: E402
from peftkit import PeftModel, get_peft_model  # noqa: E402
from peftkit.engine.config import TargetedConfig  # noqa: E402
from peftkit.engine.registry import _REGISTRY, supported_methods  # noqa: E402
from peftkit.engine.validation import _hints  # noqa: E402

MLP = MODELS["mlp"]
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
SKIP_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}

HOSTILE = st.sampled_from([
    None, True, False, 0, 1, 2, 3, -1, 4, 8, 16, 17, 33, 10**9, 2**63, 0.0, 0.5, 0.999, 1.0, -0.5, 1e30,
    float("nan"), float("inf"), -float("inf"), "", "abc", "lin0", "lin[0", "(", "none", "all", "gaussian", "pissa",
    "pissa_niter_2", "lycoris", "bat", "mini", "all-linear", [], ["lin0"], ["lin1", "lin0"], ["nothing"], [0], [1.5],
    [0.1], [True], {}, {"lin0": 2}, {"lin0": 0}, {"lin(": 2}, {"lin1": 0.5}, {"lin0": float("nan")}, ["lin0", 4],
])


def _typed(ann):
    """Plausible values of an annotation (hostile ones come from HOSTILE)."""
    origin = typing.get_origin(ann)
    if origin is typing.Union:
        return st.one_of([_typed(a) for a in typing.get_args(ann)])
    if ann is type(None):
        return st.none()
    if ann is bool:
        return st.booleans()
    if ann is int:
        return st.integers(-2, 40)
    if ann is float:
        return st.floats(-4, 40, allow_nan=False) | st.sampled_from([0.0, 0.1, 0.5, 1.0])
    if ann is str:
        return st.sampled_from(["lin0", "none", "all", "gaussian", "lycoris", "bat", "mini", "x"])
    if origin in (list, tuple, set):
        return st.lists(st.sampled_from(["lin0", "lin1", "head"]), max_size=2) if typing.get_args(ann)[:1] == (str,) \
            else st.lists(st.integers(0, 3), max_size=2)
    if origin is dict or ann is dict:
        return st.dictionaries(st.sampled_from(["lin0", "lin1"]), st.integers(1, 8) | st.floats(0.5, 4), max_size=1)
    return HOSTILE


def _perturbation(config_cls):
    hints = _hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls) if f.name not in SKIP_FIELDS]
    field_values = {n: st.one_of(HOSTILE, _typed(hints.get(n, typing.Any))) for n in names}
    return st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({n: field_values[n] for n in chosen})
    )


def _base_kwargs(config_cls):
    kw = {}
    if issubclass(config_cls, TargetedConfig):
        kw["target_modules"] = ["lin0", "lin1"]
    names = {f.name for f in dataclasses.fields(config_cls)}
    if "total_step" in names:
        kw["total_step"] = 20
    if "adapters" in names:  # X-LoRA: expert folders (only read by get_peft_model)
        kw["adapters"] = {"a": "/nonexistent/expert"}
    if "adapter_len" in names:  # Llama-Adapter: both sizes are required (no defaults, as in PEFT)
        kw.update(adapter_len=4, adapter_layers=1)
    if "num_virtual_tokens" in names:
        kw["num_virtual_tokens"] = 4
    if config_cls is peftkit.BnConfig:  # the general form has no defaults for these (as AdapterHub's)
        kw.update(mh_adapter=False, output_adapter=True, reduction_factor=4, non_linearity="relu")
    if config_cls is peftkit.MissConfig:
        kw["r"] = 8  # its default (64) is larger than the tiny model's layers
    return kw


def _names_a_field(exc: BaseException, fields, config_cls=None) -> bool:
    """The message names one of ``fields`` (or, for an error about a default value, any field of the class) as
    ``Class.field``, ``field=`` or, for names of 3+ characters, the bare word."""
    import re

    text = str(exc)
    names = set(fields) | ({f.name for f in dataclasses.fields(config_cls)} if config_cls else set())
    return any(
        f".{f}" in text or f"{f}=" in text or f"{f}[" in text or (len(f) >= 3 and re.search(rf"\b{re.escape(f)}\b", text))
        for f in names
    )


def _adapter_params(model):
    for _, layer in model.base_model.adapter_layers():
        for _, p in layer.adapter_parameters("default"):
            yield p


def _close(a, b, tol, what):
    scale = max(1.0, b.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= tol * scale, f"{what}: {diff:.3g} > {tol * scale:.3g}"


def _check(config_cls, perturb):
    kwargs = {**_base_kwargs(config_cls), **perturb}
    try:
        config = config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        assert _names_a_field(exc, perturb), f"{config_cls.__name__}({perturb}) raised without naming a field: {exc}"
        return "config"
    base = MLP.build()
    try:
        model = get_peft_model(base, config)
    except (TypeError, ValueError) as exc:
        # the field (or the module it names) says what to fix; the base model is left untouched
        assert _names_a_field(exc, perturb, config_cls), (
            f"get_peft_model({config_cls.__name__}({perturb})) raised without naming a field: {exc}")
        assert not any(".base_layer." in n or "modules_to_save" in n for n, _ in base.named_modules())
        return "model"
    model.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in _adapter_params(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with torch.no_grad():
        out = model(X)
    assert torch.isfinite(out).all(), f"{config_cls.__name__}({perturb}): non-finite output"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(MLP.build(), tmp)
        with torch.no_grad():
            assert torch.equal(loaded(X), out), f"{config_cls.__name__}({perturb}): save/load changed the output"
    spec = _REGISTRY[str(config.peft_type)]
    if spec.supports_merge:
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        with torch.no_grad():
            model.merge_adapter()
            merged = model(X)
            model.unmerge_adapter()
            again = model(X)
        assert torch.isfinite(merged).all()
        _close(merged, out, 1e-3, f"{config_cls.__name__}({perturb}): merged != unmerged")
        _close(again, out, 1e-4, f"{config_cls.__name__}({perturb}): unmerge did not restore the output")
        for n, p in model.named_parameters():
            if n in weights:
                _close(p.detach(), weights[n], 1e-4, f"{n} after unmerge")
    return "model"


# X-LoRA's config names checkpoint folders of LoRA experts; its model-level round trip has its own tests.
CONFIG_CLASSES = sorted({_REGISTRY[m].config_cls for m in supported_methods()} | {peftkit.KronAConfig},
                        key=lambda c: c.__name__)
MODEL_CLASSES = [c for c in CONFIG_CLASSES if issubclass(c, TargetedConfig)]


@pytest.mark.parametrize("config_cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_any_field_value_is_refused_naming_the_field_or_yields_a_config(config_cls):
    @settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_perturbation(config_cls))
    def run(perturb):
        kwargs = {**_base_kwargs(config_cls), **perturb}
        try:
            config_cls(**kwargs)
        except (TypeError, ValueError) as exc:
            assert _names_a_field(exc, perturb), f"{config_cls.__name__}({perturb}): {exc}"

    run()


@pytest.mark.parametrize("config_cls", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_any_field_value_is_refused_or_round_trips(config_cls):
    seen = set()

    @settings(max_examples=25, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_perturbation(config_cls))
    def run(perturb):
        seen.add(_check(config_cls, perturb))

    run()
    assert "model" in seen  # some drawn configs built working models (the property is not vacuous)


@pytest.mark.slow
@pytest.mark.parametrize("config_cls", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_any_field_value_is_refused_or_round_trips_many(config_cls):
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_perturbation(config_cls))
    def run(perturb):
        _check(config_cls, perturb)

    run()
