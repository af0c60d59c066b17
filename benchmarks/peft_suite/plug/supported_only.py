"""pytest plugin: keep only tests whose parametrised config classes are methods peftkit supports, and drop the
tests of LoRA *variants* peftkit does not implement (other methods from the literature that PEFT builds into
LoraConfig through a field: BD-LoRA, VeLoRA, MonteCLoRA, KaSA, MiCA, Arrow, LoRA-GA, QA-LoRA, aLoRA, Megatron)."""
import inspect
SUPPORTED = {"LoraConfig", "LoHaConfig", "LoKrConfig", "AdaLoraConfig", "OFTConfig", "BOFTConfig", "HRAConfig",
             "MissConfig", "XLoraConfig", "IA3Config", "LNTuningConfig", "PromptTuningConfig",
             "PrefixTuningConfig", "PromptEncoderConfig", "AdaptionPromptConfig"}
VARIANT_FIELDS = {"use_bdlora", "velora_config", "monteclora_config", "kasa_config", "arrow_config",
                  "lora_ga_config", "use_qalora", "alora_invocation_tokens", "megatron_config"}
VARIANT_INITS = {"mica"}


def _variant(params):
    for v in params.values():
        if isinstance(v, dict):
            if any(v.get(k) not in (None, False) for k in VARIANT_FIELDS):
                return True
            if isinstance(v.get("init_lora_weights"), str) and v["init_lora_weights"].lower() in VARIANT_INITS:
                return True
    return False

def _classes(v):
    if inspect.isclass(v):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _classes(x)

def pytest_collection_modifyitems(session, config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        names = {c.__name__ for v in params.values() for c in _classes(v) if c.__name__.endswith("Config")}
        (keep if names <= SUPPORTED and not _variant(params) else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


import os as _os


def pytest_collection_finish(session):
    pass


_every = int(_os.environ.get("SAMPLE_EVERY", "1"))
_orig = pytest_collection_modifyitems


def pytest_collection_modifyitems(session, config, items):  # noqa: F811
    _orig(session, config, items)
    if _every > 1:
        kept = [it for i, it in enumerate(items) if i % _every == 0]
        dropped = [it for i, it in enumerate(items) if i % _every != 0]
        items[:] = kept
        config.hook.pytest_deselected(items=dropped)
