"""Every method lives in one module here; importing this package registers them all."""

from . import lora  # noqa: F401
from . import loha  # noqa: F401
from . import lokr  # noqa: F401
from . import miss  # noqa: F401
from . import oft, boft, hra  # noqa: F401,E401
from . import adalora  # noqa: F401
from . import xlora  # noqa: F401
