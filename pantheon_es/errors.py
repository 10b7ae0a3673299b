"""One error root, typed leaves, and the closed set of reply error codes.

Every error a client can see travels as ``{"ok": false, "error": {"code",
"message", "details", "retry_after"}}``; ``code`` is one of :class:`ErrorCode`
and nothing else. A client maps the code back to the same leaf class with
:func:`error_from_reply`, so Python callers catch ``NotFoundError`` whether
the error was raised locally or came over NATS.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ErrorCode(StrEnum):
    """The closed set of error codes in replies (documented in docs/errors.md)."""

    MALFORMED = "malformed"  # the body is not a JSON object
    UNKNOWN_COMMAND = "unknown_command"  # no command or query on that subject
    INVALID = "invalid"  # the body does not validate (details: the field errors)
    TOO_LARGE = "too_large"  # the body is over the configured limit
    NOT_FOUND = "not_found"  # the entity named does not exist
    CONFLICT = "conflict"  # state changed under us, or the transition is not allowed
    UNSCHEDULABLE = "unschedulable"  # no worker could ever satisfy the request
    OVERLOADED = "overloaded"  # back off for retry_after seconds
    FORBIDDEN = "forbidden"  # not permitted for this tenant/actor
    STALE_LEASE = "stale_lease"  # a report carries a lease or fencing token that is no longer live
    UNAVAILABLE = "unavailable"  # a dependency (NATS, JetStream) did not answer
    INTERNAL = "internal"  # a bug: reported, logged, nothing appended


class PantheonError(Exception):
    """Root of every Pantheon-ES error."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, details: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.retry_after = retry_after

    def to_reply(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        if self.retry_after is not None:
            error["retry_after"] = self.retry_after
        return {"ok": False, "error": error}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class MalformedError(PantheonError, ValueError):
    code = ErrorCode.MALFORMED


class UnknownCommandError(PantheonError, LookupError):
    code = ErrorCode.UNKNOWN_COMMAND


class InvalidError(PantheonError, ValueError):
    code = ErrorCode.INVALID


class TooLargeError(PantheonError, ValueError):
    code = ErrorCode.TOO_LARGE


class NotFoundError(PantheonError, LookupError):
    code = ErrorCode.NOT_FOUND


class ConflictError(PantheonError):
    """A transition that the current state does not allow, or a lost race."""

    code = ErrorCode.CONFLICT


class ConcurrencyError(ConflictError):
    """An append met a different last sequence than it expected (JetStream 10071/10164).

    Raised by the event store only; the command service reloads the aggregate
    and decides again before it ever answers ``conflict`` to a client.
    """

    retryable = True


class UnschedulableError(PantheonError):
    code = ErrorCode.UNSCHEDULABLE


class OverloadedError(PantheonError):
    code = ErrorCode.OVERLOADED
    retryable = True


class ForbiddenError(PantheonError, PermissionError):
    code = ErrorCode.FORBIDDEN


class StaleLeaseError(PantheonError):
    code = ErrorCode.STALE_LEASE


class UnavailableError(PantheonError, ConnectionError):
    code = ErrorCode.UNAVAILABLE
    retryable = True


class InternalError(PantheonError):
    code = ErrorCode.INTERNAL


class UnknownEventTypeError(PantheonError):
    """The log holds an event type this build does not know (see ``skip_unknown``)."""

    code = ErrorCode.INTERNAL

    def __init__(self, event_type: str, seq: int | None = None) -> None:
        where = f" at stream sequence {seq}" if seq is not None else ""
        super().__init__(
            f"unknown event type {event_type!r}{where}",
            details={"type": event_type, "seq": seq},
        )
        self.event_type = event_type
        self.seq = seq


_BY_CODE: dict[ErrorCode, type[PantheonError]] = {
    ErrorCode.MALFORMED: MalformedError,
    ErrorCode.UNKNOWN_COMMAND: UnknownCommandError,
    ErrorCode.INVALID: InvalidError,
    ErrorCode.TOO_LARGE: TooLargeError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.CONFLICT: ConflictError,
    ErrorCode.UNSCHEDULABLE: UnschedulableError,
    ErrorCode.OVERLOADED: OverloadedError,
    ErrorCode.FORBIDDEN: ForbiddenError,
    ErrorCode.STALE_LEASE: StaleLeaseError,
    ErrorCode.UNAVAILABLE: UnavailableError,
    ErrorCode.INTERNAL: InternalError,
}


def error_from_reply(error: dict[str, Any]) -> PantheonError:
    """Rebuild the typed error of a ``{"code", "message", ...}`` reply object."""
    try:
        cls = _BY_CODE[ErrorCode(str(error.get("code")))]
    except ValueError:
        cls = InternalError
    return cls(
        str(error.get("message", "")),
        details=error.get("details"),
        retry_after=error.get("retry_after"),
    )
