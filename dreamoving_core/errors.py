"""The pack's one exception family.

Two kinds of user mistake, each a ``DreaMovingError`` whose message names what was given, what was expected and how
to fix it (the nodes prefix it with the node's display name):

* ``InputMismatchError`` — bad input: a value, a model name, an image or a connection that is wrong on its own or
  does not fit the others (frame counts, widths, a NaN strength, a name outside the model folders);
* ``ModelFormatError`` — bad file: a model file or folder that is missing, empty, truncated, corrupt, unsafe (a
  pickle carrying code) or a different kind of model.

Anything else (``ValueError``, ``TypeError``, ...) is a programming error: a Python caller used the API wrongly, or
a bug. Those are never raised for something a user can send.
"""
from __future__ import annotations


class DreaMovingError(Exception):
    """A user-facing error: the message names what was given, what was expected and how to fix it."""


class InputMismatchError(DreaMovingError):
    """Bad input: a value, name, image or connection that is wrong or does not fit the other inputs."""


class ModelFormatError(DreaMovingError):
    """Bad file: a model file or folder that is missing, unreadable, corrupt, unsafe or not the expected model."""
