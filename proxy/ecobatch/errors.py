"""The exception tree and its mapping onto OpenAI-style HTTP errors.

EcobatchError
├── BadRequest        400  invalid_request_error  (names the field: ``param``)
├── NotFound          404  invalid_request_error  (a route's object: an energy receipt)
│   └── ModelNotFound 404  invalid_request_error
├── BackendFailed     502  upstream_error         (the engine answered badly or not at all)
├── BackendTimeout    504  upstream_timeout
└── Retryable                                     (carries ``retry_after_s``: the Retry-After header)
    ├── Overloaded    429  rate_limit_exceeded    (the queue is full)
    ├── ShuttingDown  503  service_unavailable    (queued or running when the drain ended)
    ├── NotReady      503  service_unavailable    (starting, draining)
    └── UpstreamDown  503  service_unavailable    (the engine's circuit is open)

Callers catch the level they care about; the HTTP layer only calls ``to_body()`` (and, for a
``Retryable``, sets Retry-After).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendFailed",
    "BackendTimeout",
    "BadRequest",
    "ConfigError",
    "EcobatchError",
    "ModelNotFound",
    "NotFound",
    "NotReady",
    "Overloaded",
    "Retryable",
    "ShuttingDown",
    "UpstreamDown",
]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and the limit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class EcobatchError(Exception):
    status: int = 500
    error_type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status

    def to_body(self) -> dict[str, Any]:
        """The OpenAI error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(EcobatchError):
    status = 400
    error_type = "invalid_request_error"


class NotFound(EcobatchError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Retryable(EcobatchError):
    """An error the client may retry: ``retry_after_s`` goes out as the Retry-After header."""

    retry_after_s: float = 5.0

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class Overloaded(Retryable):
    status = 429
    error_type = "rate_limit_exceeded"
    code = "queue_full"


class BackendFailed(EcobatchError):
    status = 502
    error_type = "upstream_error"
    #: the upstream's own HTTP status, where it answered with one
    upstream_status: int | None = None
    #: no connection could be made: the request never reached the engine (safe to send elsewhere)
    connect_failed: bool = False


class BackendTimeout(EcobatchError):
    status = 504
    error_type = "upstream_timeout"


class ShuttingDown(Retryable):
    """Another replica, or this one once restarted."""

    status = 503
    error_type = "service_unavailable"
    code = "shutting_down"


class NotReady(Retryable):
    status = 503
    error_type = "service_unavailable"
    code = "not_ready"


class UpstreamDown(Retryable):
    status = 503
    error_type = "service_unavailable"
    code = "upstream_down"
