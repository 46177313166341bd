"""The error every reader raises for bad input data."""

from __future__ import annotations


class InputError(RuntimeError):
    """Bad input data: the message names the volume and the file."""
