"""kvmem's exceptions: one per status code of the C ABI (absl's codes).

Every error of the library is a :class:`kvmem.Error` carrying the code and the message
of the C++ Status. Out of memory (and out of request rows) is :class:`OutOfMemoryError`,
so that a scheduler can catch it alone and preempt::

    try:
        locs = cache.extend_batch(ids, counts)
    except kvmem.OutOfMemoryError:
        preempt_some_requests()
"""

__all__ = [
    "Error", "CancelledError", "UnknownError", "InvalidArgumentError", "DeadlineExceededError",
    "NotFoundError", "AlreadyExistsError", "PermissionDeniedError", "OutOfMemoryError",
    "FailedPreconditionError", "AbortedError", "OutOfRangeError", "UnimplementedError",
    "InternalError", "UnavailableError", "DataLossError", "UnauthenticatedError",
    "error_for_code",
]

CODE_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)


class Error(Exception):
    """Base of every kvmem error. ``code`` is the status code (absl's number) and
    ``code_name`` its name ("NOT_FOUND"); ``message`` the Status message."""

    code = 2

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    @property
    def code_name(self):
        return CODE_NAMES[self.code] if 0 <= self.code < len(CODE_NAMES) else "UNKNOWN"

    def __str__(self):
        return f"{self.code_name}: {self.message}"


class CancelledError(Error):
    code = 1


class UnknownError(Error):
    code = 2


class InvalidArgumentError(Error, ValueError):
    """A bad argument: a config field, a count, a tensor's dtype, shape or device."""
    code = 3


class DeadlineExceededError(Error):
    code = 4


class NotFoundError(Error):
    """An unknown request id."""
    code = 5


class AlreadyExistsError(Error):
    """add_request or fork onto a live id."""
    code = 6


class PermissionDeniedError(Error):
    code = 7


class OutOfMemoryError(Error, MemoryError):
    """RESOURCE_EXHAUSTED: no free page or physical memory, or every request row in use.
    The cache is exactly as before the call."""
    code = 8


class FailedPreconditionError(Error):
    """A call that does not apply (the other layout, a host cache given to a kernel...)."""
    code = 9


class AbortedError(Error):
    code = 10


class OutOfRangeError(Error, IndexError):
    """A length past max_context or below 0, a layer index out of range."""
    code = 11


class UnimplementedError(Error, NotImplementedError):
    """Also: a kernel called on a library built without CUDA."""
    code = 12


class InternalError(Error):
    """A violated invariant (a kvmem bug) or an unexpected failure."""
    code = 13


class UnavailableError(Error):
    """The CUDA backend where no driver or GPU is found."""
    code = 14


class DataLossError(Error):
    code = 15


class UnauthenticatedError(Error):
    code = 16


_BY_CODE = {cls.code: cls for cls in (
    CancelledError, UnknownError, InvalidArgumentError, DeadlineExceededError, NotFoundError,
    AlreadyExistsError, PermissionDeniedError, OutOfMemoryError, FailedPreconditionError,
    AbortedError, OutOfRangeError, UnimplementedError, InternalError, UnavailableError,
    DataLossError, UnauthenticatedError)}


def error_for_code(code, message):
    """The exception of a status code (UnknownError for a number that is no code)."""
    cls = _BY_CODE.get(code, UnknownError)
    return cls(message, code if code in _BY_CODE else None)
