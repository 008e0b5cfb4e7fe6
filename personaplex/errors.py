"""Typed errors. Each message says what went wrong and what to do next."""

from __future__ import annotations


class PersonaplexError(Exception):
    """Base class for errors meant to be shown to a user as one line, without a traceback."""


class CheckpointError(PersonaplexError):
    """A weights file is missing, unreadable, or does not match the model it is loaded into."""


class UsageError(PersonaplexError):
    """Command-line arguments that do not fit together."""
