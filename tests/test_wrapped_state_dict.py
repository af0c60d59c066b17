"""Issue 17: get_peft_model_state_dict / set_peft_model_state_dict on a model wrapped by FSDP v1, DDP,
torch.nn.DataParallel or torch.compile (the wrapper is what a training script holds), against Hugging Face PEFT
given the same weights. A single-process gloo world, as PEFT's own test; ``test_fsdp_full_shard_two_ranks`` runs
FSDP v1 with real sharding (FULL_SHARD over 2 processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import peftkit
from peftkit import (
    HRAConfig,
    LoHaConfig,
    LoraConfig,
    OFTConfig,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)

peft = pytest.importorskip("peft")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402
from torch.distributed.fsdp.wrap import ModuleWrapPolicy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
X = torch.arange(90, dtype=torch.float32).view(9, 10) / 30


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.head = nn.Linear(20, 2)

    def forward(self, X):
        return self.head(self.relu(self.lin1(self.relu(self.lin0(X)))))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module", autouse=True)
def world():
    """A one-process gloo world (as PEFT's FSDP test builds it); left alone if the session already has one."""
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def _trained(lib, config_kwargs=None, cls="LoraConfig", seed=1):
    """A model of ``lib`` (peft or peftkit) with non-trivial adapter weights, the same for both libraries."""
    kwargs = dict(target_modules=["lin0", "lin1"], **(config_kwargs or {}))
    model = lib.get_peft_model(_mlp(), getattr(lib, cls)(**kwargs)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _fsdp(model, **kw):
    return FSDP(model, use_orig_params=True, device_id="cpu", **kw)


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("cls,extra", [("LoraConfig", {}), ("LoraConfig", {"bias": "all"}),
                                       ("LoraConfig", {"modules_to_save": ["head"]}), ("LoHaConfig", {}),
                                       ("HRAConfig", {})])
def test_fsdp_state_dict_equals_peft_and_the_unwrapped_one(cls, extra):
    theirs, ours = _trained(peft, extra, cls), _trained(peftkit, extra, cls)
    plain = get_peft_model_state_dict(ours)
    _equal(get_peft_model_state_dict(_fsdp(ours)), plain)
    assert plain  # a checkpoint, not nothing
    theirs_sd = peft.get_peft_model_state_dict(_fsdp(theirs))
    _equal(plain, theirs_sd)


def test_fsdp_round_trip_reproduces_outputs_and_is_a_copy():
    model = _fsdp(_trained(peftkit))
    with torch.no_grad():
        before = model(X)
    sd = get_peft_model_state_dict(model)
    # a detached copy, not FSDP's storage: changing the model afterwards leaves the checkpoint alone
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    fresh = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0", "lin1"])).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(X), before)
    set_peft_model_state_dict(fresh, sd)
    with torch.no_grad():
        assert torch.allclose(fresh(X), before)


def test_set_into_fsdp_wrapped_model_changes_its_output():
    source = _trained(peftkit)
    sd = get_peft_model_state_dict(source)
    target = _fsdp(get_peft_model(_mlp(), LoraConfig(target_modules=["lin0", "lin1"])).eval())
    result = set_peft_model_state_dict(target, sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        assert torch.allclose(target(X), source(X))
    _equal(get_peft_model_state_dict(target), sd)


def test_nested_fsdp_units_leave_their_names_out_of_the_keys():
    from peftkit.engine.layer import AdapterLayer

    ours = _trained(peftkit)
    plain = get_peft_model_state_dict(ours)
    wrapped = _fsdp(ours, auto_wrap_policy=ModuleWrapPolicy({AdapterLayer}))
    assert any("_fsdp_wrapped_module.base_model.model.lin0._fsdp_wrapped_module" in n
               for n, _ in wrapped.named_parameters())  # the adapter layers really are FSDP units
    _equal(get_peft_model_state_dict(wrapped), plain)
    target = _fsdp(get_peft_model(_mlp(), LoraConfig(target_modules=["lin0", "lin1"])).eval(),
                   auto_wrap_policy=ModuleWrapPolicy({AdapterLayer}))
    assert set_peft_model_state_dict(target, plain).missing_keys == []
    _equal(get_peft_model_state_dict(target), plain)


def test_fsdp_bias_all_checkpoint_loads_into_a_bias_none_model_like_peft():
    """PEFT's learnable-bias round trip: biases saved with bias="all" load into a model configured without."""
    results = []
    for lib in (peft, peftkit):
        src = _trained(lib, {"bias": "all"})
        with torch.no_grad():
            for m in src.modules():
                if isinstance(getattr(m, "bias", None), torch.Tensor):
                    m.bias.fill_(1.23)
        wrapped = _fsdp(src)
        with torch.no_grad():
            before = wrapped(X)
        sd = lib.get_peft_model_state_dict(wrapped)
        fresh = lib.get_peft_model(_mlp(), lib.LoraConfig(target_modules=["lin0", "lin1"])).eval()
        lib.set_peft_model_state_dict(fresh, sd)
        with torch.no_grad():
            after = fresh(X)
        assert torch.allclose(after, before)
        results.append(after)
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_fsdp_without_orig_params_is_refused_clearly():
    model = _trained(peftkit)
    model.requires_grad_(True)  # FSDP itself refuses mixed requires_grad in one flat parameter without orig params
    model = FSDP(model, use_orig_params=False, device_id="cpu")
    with pytest.raises(ValueError, match="use_orig_params=True"):
        get_peft_model_state_dict(model)


def test_hra_and_oft_outputs_do_not_change_when_wrapped_in_fsdp():
    """FSDP v1 hands frozen base weights to the layer as views with requires_grad=True; under no_grad the layer
    must still compute exactly what it computes unwrapped (PEFT's FSDP round trip compares with allclose)."""
    for config in (HRAConfig(target_modules=["lin0"], init_weights=False),
                   OFTConfig(target_modules=["lin0"], r=0, oft_block_size=5, init_weights=False)):
        model = get_peft_model(_mlp(), config).eval()
        with torch.no_grad():
            plain = model(X)
            wrapped = _fsdp(model)(X)
        assert torch.equal(plain, wrapped), type(config).__name__


def test_ddp_dataparallel_and_compile_wrappers_are_unwrapped():
    from torch.nn.parallel import DistributedDataParallel as DDP

    ours = _trained(peftkit)
    plain = get_peft_model_state_dict(ours)
    for wrapper in (DDP(ours), nn.DataParallel(ours), torch.compile(ours), DDP(torch.compile(ours))):
        _equal(get_peft_model_state_dict(wrapper), plain)
    # the wrapper's own state dict (DDP: keys under "module.") is read through the wrapper's names
    ddp = DDP(ours)
    full = {k: v + 1 for k, v in ddp.state_dict().items()}
    got = get_peft_model_state_dict(ddp, state_dict=full)
    _equal(got, {k: v + 1 for k, v in plain.items()})
    # and loading through a wrapper writes the wrapped model
    target = get_peft_model(_mlp(), LoraConfig(target_modules=["lin0", "lin1"])).eval()
    set_peft_model_state_dict(DDP(target), plain)
    _equal(get_peft_model_state_dict(target), plain)


def test_wrapped_model_with_injected_adapters():
    base = inject_adapter_in_model(LoraConfig(target_modules=["lin0"]), _mlp())
    with torch.no_grad():
        base.lin0.lora_B["default"].weight.fill_(0.5)
    plain = get_peft_model_state_dict(base)
    assert set(plain) == {"lin0.lora_A.weight", "lin0.lora_B.weight"}
    _equal(get_peft_model_state_dict(_fsdp(base)), plain)


def test_a_wrapper_without_adapters_names_what_to_pass():
    from torch.nn.parallel import DistributedDataParallel as DDP

    with pytest.raises(ValueError, match="holds no peftkit adapters"):
        get_peft_model_state_dict(DDP(_mlp()))


def test_fsdp_full_shard_two_ranks(tmp_path):
    """Real sharding: FSDP v1 FULL_SHARD over 2 gloo processes; every rank gets the full adapter tensors (equal to
    the unwrapped model's), and a checkpoint loaded on every rank lands in each rank's shard."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.join(HERE, "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fsdp1_worker.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = get_peft_model_state_dict(_trained(peftkit))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _equal(saved["got"], expected)
        assert saved["sharded"]  # the adapter parameters really were split across the ranks
        _equal(saved["after_load"], {k: v * 2 for k, v in expected.items()})
