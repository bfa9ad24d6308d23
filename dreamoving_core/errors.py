"""The pack's one exception family: every user mistake is reported as a subclass of DreaMovingError."""
from __future__ import annotations


class DreaMovingError(Exception):
    """A user-facing error: the message names what was given, what was expected and how to fix it."""


class ModelFormatError(DreaMovingError):
    """A weights file is not the kind of model the loader expected (wrong family, architecture or corrupt)."""


class InputMismatchError(DreaMovingError):
    """Inputs that do not fit together (frame counts, widths, image sizes)."""
