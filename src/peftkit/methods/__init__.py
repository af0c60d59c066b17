"""Every method lives in one module here; importing this package registers them all."""

from peftkit.methods.lora import lora  # noqa: F401
from peftkit.methods.lycoris import loha  # noqa: F401
from peftkit.methods.lycoris import lokr  # noqa: F401
from peftkit.methods.lycoris import miss  # noqa: F401
from peftkit.methods.orthogonal import oft  # noqa: F401,E401
from peftkit.methods.orthogonal import boft  # noqa: F401,E401
from peftkit.methods.orthogonal import hra  # noqa: F401,E401
from peftkit.methods.lora import adalora  # noqa: F401
from peftkit.methods.lora import xlora  # noqa: F401
from peftkit.methods.adapters import bottleneck  # noqa: F401
from peftkit.methods.adapters import compacter  # noqa: F401
from peftkit.methods.adapters import ia3  # noqa: F401
from peftkit.methods.adapters import ln_tuning  # noqa: F401
from peftkit.methods.adapters import bitfit  # noqa: F401
from peftkit.methods.prompts import prompt_tuning  # noqa: F401
from peftkit.methods.prompts import prefix_tuning  # noqa: F401
from peftkit.methods.prompts import p_tuning  # noqa: F401
from peftkit.methods.prompts import llama_adapter  # noqa: F401
from peftkit.methods.hybrids import mam  # noqa: F401
from peftkit.methods.hybrids import unipelt  # noqa: F401
from peftkit.methods.hybrids import ah_prefix  # noqa: F401
