"""The engine's error taxonomy.

Every failure the engine reports to a caller is one of these. Each carries a stable
machine-readable ``code`` and, where one input is to blame, the ``param`` that names it.
The HTTP layer maps these classes to status codes in exactly one place.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises to its callers."""

    code = "engine_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):
        # Keep the fields across pickling (Ray sends exceptions between processes).
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls, message, state):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class InvalidRequestError(EngineError):
    """A request field has a value the engine cannot serve; ``param`` names the field."""

    code = "invalid_request"


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus the requested completion) does not fit the model's context."""

    code = "context_length_exceeded"


class ModelNotFoundError(EngineError):
    """The request names a model this engine has not loaded."""

    code = "model_not_found"


class ModelLoadError(EngineError):
    """A model could not be loaded (missing folder, unknown architecture, bad weights)."""

    code = "model_load_failed"


class QueueFullError(EngineError):
    """Admission was refused; the caller should retry after ``retry_after`` seconds.

    ``limit`` names the bound that was hit: "requests", "tokens" or "kv_memory" (queued
    work), or "shed_batch" for a ``LoadShedError``.
    """

    code = "queue_full"

    def __init__(self, message: str, *, retry_after: float = 1.0, limit: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit


class LoadShedError(QueueFullError):
    """A batch-class request refused while the engine sheds batch work under load."""

    code = "load_shed"


class EngineClosedError(EngineError):
    """The engine is shutting down or its scheduler thread has died."""

    code = "engine_closed"


class ReaderStalledError(EngineError):
    """The request's reader stopped consuming output for longer than the configured timeout."""

    code = "reader_stalled"


class DeadlineExceededError(EngineError):
    """The request's deadline (``timeout_s``) passed before it finished."""

    code = "deadline_exceeded"
