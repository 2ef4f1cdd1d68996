"""The error hierarchy clients see. Named after what happened; each carries a retry hint.

Inside the cores, expected outcomes are return values; these exceptions are raised
only at the client boundary (STYLE rule 6).
"""

from __future__ import annotations


class LoomError(Exception):
    """Base of every error loom raises on purpose; `retryable`: may trying again help."""

    retryable = False

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class InvalidArgument(LoomError):
    """The request is malformed or over a limit; the same request will fail again."""


class NotFound(LoomError):
    """A named thing (keyspace, call, tenant) does not exist."""


class PermissionDenied(LoomError):
    """The token does not reach this resource."""


class ConditionFailed(LoomError):
    """A conditional write's condition did not hold; nothing was written."""


class TransactionConflict(LoomError):
    """A key read by the transaction changed after its snapshot; nothing was written."""

    retryable = True


class Throttled(LoomError):
    """Over a quota or overloaded; try again after `retry_after_ms`."""

    retryable = True


class QuotaExceeded(LoomError):
    """A write would grow a keyspace that is over its stored-bytes quota. Waiting does not
    help: delete data (deletes are still accepted) or raise the quota."""


class Unavailable(LoomError):
    """No replica could serve the request in time (failover, partition)."""

    retryable = True


class WriteLost(LoomError):
    """A FAST_ACK write was acknowledged by a primary that lost it in a failover."""


class OutcomeUnknown(LoomError):
    """A commit may or may not have happened; the caller must not blindly re-run it."""


class ConnectionFailed(LoomError):
    """A connection could not be set up, and trying again will not help until a setting
    changes: TLS on one side only, or a certificate the other side refuses (ADR 0015)."""


class TlsRequired(ConnectionFailed):
    """The server expects TLS and this client connected without it."""


class CertificateRefused(ConnectionFailed):
    """A certificate failed verification: the server's (by this client's CA) or this
    client's (by the server)."""
