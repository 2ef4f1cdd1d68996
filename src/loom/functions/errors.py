"""Errors of the functions platform that user code meets or raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.core.errors import LoomError

if TYPE_CHECKING:
    from loom.functions.queue import CallRecord


class CallFailed(LoomError):
    """The call ran out of attempts (dead-lettered) or expired; `.record` says why."""

    def __init__(self, message: str, record: CallRecord) -> None:
        super().__init__(message)
        self.record = record


class NonRetryable(Exception):
    """Raise from a function to dead-letter the call at once, without further attempts."""
