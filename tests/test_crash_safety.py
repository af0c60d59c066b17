"""Fault injection: a process saving an adapter is killed (SIGKILL) at every step of the save and at random
moments; the folder then loads as exactly the old or the new adapter. Concurrent savers and a concurrent reader
never produce or see a mix.

Child processes are forked from the test process (models already built, so a child starts in microseconds); a
child never returns into pytest (``os._exit``).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time

import pytest
import torch

from models import MODELS
from peftkit import LoraConfig, PeftModel, get_peft_model, get_adapter_state_dict
from peftkit.engine import io

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"), reason="needs fork")

SPEC = MODELS["mlp"]
GENERATIONS = 6


def _model(gen: int):
    """Adapter generation ``gen``: its weights come from seed ``gen`` and its lora_alpha is ``gen + 1`` (so a config
    of one generation with the weights of another gives other outputs)."""
    torch.manual_seed(1000 + gen)
    config = LoraConfig(r=4, lora_alpha=gen + 1, target_modules=["lin0", "lin1"], init_lora_weights=False)
    model = get_peft_model(SPEC.build(), config)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=gen + 1, target_modules=["lin1"], init_lora_weights=False))
    return model


@pytest.fixture(scope="module")
def generations():
    models = [_model(g) for g in range(GENERATIONS)]
    expected = [{n: get_adapter_state_dict(m.base_model, n) for n in ("default", "other")} for m in models]
    return models, expected


def _generation_of(path: str, expected, names=("default", "other")) -> int:
    """Load ``path`` (root and/or sub-folder) and return its generation; fail if it is not exactly one generation."""
    if names == ("other",):
        loaded = PeftModel.from_pretrained(SPEC.build(), os.path.join(path, "other"), adapter_name="other")
    else:
        loaded = PeftModel.from_pretrained(SPEC.build(), path)
        if "other" in names:
            loaded.load_adapter(os.path.join(path, "other"), "other")
    gen = int(loaded.peft_config[names[0]].lora_alpha) - 1
    assert 0 <= gen < len(expected), gen
    for name in names:
        assert int(loaded.peft_config[name].lora_alpha) - 1 == gen, "root and sub-folder come from different saves"
        got = get_adapter_state_dict(loaded.base_model, name)
        want = expected[gen][name]
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name}:{k} does not match generation {gen}"
    return gen


def _fork(fn) -> int:
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            fn()
        except BaseException:  # pragma: no cover - reported through the exit code
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _leftovers(path: str) -> list[str]:
    parent, base = os.path.split(os.path.realpath(path))
    return [n for n in os.listdir(parent) if n.startswith(f".{base}.peftkit-") and not n.endswith("-lock")]


def _save_steps(model, path: str) -> list[tuple[str, int]]:
    """The (step, occurrence) sequence of one save of ``model`` over an existing folder."""
    seen: list[str] = []
    io._FAULT_HOOK = seen.append
    try:
        model.save_pretrained(path)
    finally:
        io._FAULT_HOOK = None
    return [(s, seen[: i + 1].count(s)) for i, s in enumerate(seen)]


def _kill_at(step: str, occurrence: int):
    count = {"n": 0}

    def hook(name: str) -> None:
        if name == step:
            count["n"] += 1
            if count["n"] == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _no_exchange(*_a, **_k) -> bool:
    return False


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_kill_at_every_step_of_a_save_leaves_old_or_new(tmp_path, generations, exchange):
    models, expected = generations
    path = str(tmp_path / "adapter")
    models[0].save_pretrained(path)
    if not exchange:
        real = io._exchange
        io._exchange = _no_exchange
    try:
        steps = _save_steps(models[1], path)
    finally:
        if not exchange:
            io._exchange = real
    names = [s for s, _ in steps]
    assert "staged" in names and ("exchanged" in names if exchange else "moved-old" in names), names
    outcomes = {}
    for step, occurrence in steps:
        shutil.rmtree(path)
        models[0].save_pretrained(path)  # old = generation 0; also cleans what the previous kill left

        def child(step=step, occurrence=occurrence):
            if not exchange:
                io._exchange = _no_exchange
            io._FAULT_HOOK = _kill_at(step, occurrence)
            models[1].save_pretrained(path)

        assert _wait(_fork(child)) == -signal.SIGKILL, f"the child was not killed at {step}#{occurrence}"
        gen = _generation_of(path, expected)
        outcomes[(step, occurrence)] = gen
        # once the new folder is in place the save has happened; before, the old one must be untouched
        if step in ("exchanged", "exchanged-synced", "moved-new", "cleaned", "renamed"):
            assert gen == 1, (step, occurrence)
        if step in ("carried", "file-written", "file-replaced", "staged"):
            assert gen == 0, (step, occurrence)
        # leftovers of the killed save are ignored by loads and removed by the next save
        models[2].save_pretrained(path)
        assert _leftovers(path) == [], (step, _leftovers(path))
        assert _generation_of(path, expected) == 2
    assert set(outcomes.values()) == {0, 1}


def test_kill_between_the_two_renames_is_recovered_by_the_next_load(tmp_path, generations):
    """The fallback's worst moment: the old folder moved aside, the new one not yet in place."""
    models, expected = generations
    path = str(tmp_path / "adapter")
    models[0].save_pretrained(path)

    def child():
        io._exchange = _no_exchange
        io._FAULT_HOOK = _kill_at("moved-old", 1)
        models[1].save_pretrained(path)

    assert _wait(_fork(child)) == -signal.SIGKILL
    assert not os.path.exists(path)  # only the old copy beside it
    assert _generation_of(path, expected) == 0  # the load puts the complete old adapter back
    assert _leftovers(path) == []


def _random_kills(tmp_path, generations, rounds: int, seed: int) -> set[int]:
    models, expected = generations
    path = str(tmp_path / "adapter")
    models[0].save_pretrained(path)
    rng = random.Random(seed)
    seen = set()
    for _ in range(rounds):
        def child():
            g = 1
            while True:
                models[g].save_pretrained(path)
                g = g % (GENERATIONS - 1) + 1

        pid = _fork(child)
        time.sleep(rng.uniform(0.0, 0.4))  # a save takes ~0.1 s (fsyncs): kills land in several saves
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid) == -signal.SIGKILL
        seen.add(_generation_of(path, expected))
    models[0].save_pretrained(path)
    assert _leftovers(path) == []
    return seen


def test_kill_at_random_moments_leaves_a_complete_adapter(tmp_path, generations):
    seen = _random_kills(tmp_path, generations, rounds=12, seed=0)
    assert seen  # every kill left one complete generation (checked inside)


@pytest.mark.slow
def test_kill_at_random_moments_many_times(tmp_path, generations):
    seen = _random_kills(tmp_path, generations, rounds=300, seed=1)
    assert len(seen) > 1


def _concurrency(tmp_path, generations, saves_per_process: int, exchange: bool = True) -> tuple[int, set[int]]:
    models, expected = generations
    path = str(tmp_path / "adapter")
    models[0].save_pretrained(path)

    def saver(gens):
        def run():
            if not exchange:  # the two-rename fallback: the folder is briefly missing during each save
                io._exchange = _no_exchange
            for i in range(saves_per_process):
                models[gens[i % len(gens)]].save_pretrained(path)
        return run

    pids = [_fork(saver([1, 2])), _fork(saver([3, 4, 5]))]
    loads, seen, statuses = 0, set(), {}
    while True:
        for p in pids:
            if p not in statuses:
                got, status = os.waitpid(p, os.WNOHANG)
                if got:
                    statuses[p] = status
        finished = len(statuses) == len(pids)
        # one load never sees a mix, even while savers swap the folder under it
        seen.add(_generation_of(path, expected, names=("default",)))
        seen.add(_generation_of(path, expected, names=("other",)))
        # two loads (root, then a sub-folder) see one save when the reader holds the folder's shared lock
        with io.folder_lock(path, shared=True):
            seen.add(_generation_of(path, expected))
        loads += 3
        if finished:
            break
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses.values()), statuses
    final = _generation_of(path, expected)
    assert final in (2, 1, 3, 4, 5)
    # not only detected: the files on disk are one save's pair
    cfg = io.read_config_file(os.path.join(path, "adapter_config.json"))
    _, metadata = io.read_safetensors(os.path.join(path, "adapter_model.safetensors"))
    assert metadata[io.CONFIG_DIGEST_KEY] == io.config_digest(cfg)
    assert _leftovers(path) == []
    return loads, seen


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_concurrent_savers_and_a_reader_never_see_a_mix(tmp_path, generations, exchange):
    loads, seen = _concurrency(tmp_path, generations, saves_per_process=20, exchange=exchange)
    assert loads >= 1
    assert not [n for n in os.listdir(tmp_path / "adapter") if "peftkit" in n]  # readers create no files


@pytest.mark.slow
def test_concurrent_savers_and_a_reader_many_saves(tmp_path, generations):
    loads, seen = _concurrency(tmp_path, generations, saves_per_process=400)
    assert loads > 10 and len(seen) > 2


def test_a_folder_mixing_two_saves_is_refused_on_load(tmp_path, generations):
    models, expected = generations
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    models[1].save_pretrained(a)
    models[2].save_pretrained(b)
    shutil.copy(os.path.join(b, "adapter_config.json"), os.path.join(a, "adapter_config.json"))  # "written by anything"
    base = SPEC.build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_config.json and .*adapter_model.safetensors do not belong together"):
        PeftModel.from_pretrained(base, a)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not any(".lora_" in n for n, _ in base.named_parameters())


def test_hand_edits_of_descriptive_keys_still_load(tmp_path, generations):
    import json

    models, expected = generations
    path = str(tmp_path / "a")
    models[3].save_pretrained(path)
    cfg_path = os.path.join(path, "adapter_config.json")
    data = json.load(open(cfg_path))
    data["base_model_name_or_path"] = "my-org/my-base"
    data["inference_mode"] = False
    json.dump(data, open(cfg_path, "w"), indent=4)  # another layout too
    assert _generation_of(path, expected) == 3


def test_save_keeps_other_files_and_folders_and_writes_no_temp_files(tmp_path, generations):
    models, expected = generations
    path = tmp_path / "adapter"
    models[0].save_pretrained(path)
    (path / "README.md").write_text("notes")
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.txt").write_text("a b c")
    (path / "adapter_model.bin").write_bytes(b"stale legacy weights")  # would shadow nothing, but is stale
    only_default = _model(0)
    only_default.delete_adapter("other")
    only_default.save_pretrained(path)
    assert (path / "README.md").read_text() == "notes"
    assert (path / "tokenizer" / "vocab.txt").read_text() == "a b c"
    assert (path / "other" / "adapter_config.json").exists()  # an adapter not saved this time is kept
    assert not (path / "adapter_model.bin").exists()
    assert sorted(os.listdir(tmp_path)) == [".adapter.peftkit-lock", "adapter"]


def test_a_folder_whose_parent_is_read_only_is_saved_in_place(tmp_path, generations, monkeypatch):
    """No sibling can be created next to the folder: the save writes file by file (each atomically) instead of
    failing, and the result loads."""
    models, expected = generations
    path = str(tmp_path / "adapter")
    models[0].save_pretrained(path)
    inode = os.stat(path).st_ino
    monkeypatch.setattr(io, "_parent_writable", lambda p: False)
    models[4].save_pretrained(path)
    assert os.stat(path).st_ino == inode  # the same folder, written in place
    assert _generation_of(path, expected) == 4
    assert _leftovers(path) == [] and not [n for n in os.listdir(path) if n.startswith(".tmp-")]
