"""Integrations with the clients PEFT users train with: transformers' ``Trainer``, TRL, accelerate,
sentence-transformers. Importing this package imports none of them (nor ``peft``); hooks wait for their import.

* :mod:`.peft_compat`: accepted where clients check for Hugging Face PEFT's classes (when ``peft`` is installed).
* :mod:`.transformers_adapters`: transformers' ``model.add_adapter/load_adapter/...`` (used by
  sentence-transformers) with peftkit configs and adapters.
* :class:`PeftkitCallback`: adapter-only checkpoints from ``transformers.Trainer`` when ``peft`` is not installed.
"""

from peftkit.integrations import _hooks, peft_compat
from peftkit.integrations.trainer import PeftkitCallback
from peftkit.integrations import transformers_adapters as _transformers_adapters

_transformers_adapters.install()
# peft.get_peft_model / peft.PeftModel(...) with a peftkit config build a peftkit model (see peft_compat)
_hooks.when_imported("peft", peft_compat.install_constructor_hook)

__all__ = ["PeftkitCallback"]
