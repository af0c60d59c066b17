"""Warning classes of peftkit (PEFT's names, so that ``pytest.warns(PeftWarning)`` and warning filters written for
PEFT work unchanged)."""


class PeftWarning(UserWarning):
    """A configuration or model that works but probably not as the user intends (e.g. an adapter that cannot be
    merged later)."""
