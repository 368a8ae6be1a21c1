"""Domain errors. Cores raise these; one interceptor turns them into gRPC status codes.

`code` is the status each one maps to, in google.rpc.Code numbering.
"""


class StyleBlendError(Exception):
    """A failure a person can act on; its message is shown to them as it is."""

    code = 2  # UNKNOWN


class InvalidArgument(StyleBlendError):
    """Bad input: a corrupt image, a negative weight, an unknown layer."""

    code = 3


class DeadlineExceeded(StyleBlendError):
    """Something the call was waiting for did not come in time, e.g. a session's `start`."""

    code = 4


class ResourceExhausted(StyleBlendError):
    """Input over a configured limit."""

    code = 8


class FailedPrecondition(StyleBlendError):
    """The system is not in a state to do this, e.g. a model mismatch between services."""

    code = 9


class Unavailable(StyleBlendError):
    """An upstream service cannot be reached."""

    code = 14


class Unauthenticated(StyleBlendError):
    """No valid credentials."""

    code = 16


class NotHeld(FailedPrecondition):
    """A reference to something a service no longer keeps (evicted, or never sent to it).

    `kind` ("image", "tensor" or "targets") travels as trailing metadata, so a caller can send
    the bytes again or recompute, instead of parsing the message."""

    METADATA_KEY = "styleblend-not-held"

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
