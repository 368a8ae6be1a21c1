"""Domain errors. Cores raise these; one interceptor turns them into gRPC status codes."""


class StyleBlendError(Exception):
    """A failure a person can act on; its message is shown to them as it is."""


class InvalidArgument(StyleBlendError):
    """Bad input: a corrupt image, a negative weight, an unknown layer."""


class ResourceExhausted(StyleBlendError):
    """Input over a configured limit."""


class FailedPrecondition(StyleBlendError):
    """The system is not in a state to do this, e.g. a model mismatch between services."""


class Unavailable(StyleBlendError):
    """An upstream service cannot be reached."""


class Unauthenticated(StyleBlendError):
    """No valid credentials."""
