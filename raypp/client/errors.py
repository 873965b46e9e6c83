"""What a raypp call can fail with: one exception class per thing a caller does differently.

The server answers every failure in OpenAI's shape, `{"error": {message, type, param,
code}}`; each exception carries those fields, so `str(e)` is the server's own message
(e.g. the field it rejected, or both token counts when a prompt is too long).
"""
from __future__ import annotations

import json


class RayppError(Exception):
    """Every error the client raises."""


class APIConnectionError(RayppError):
    """No HTTP answer at all: nothing listens at the URL, the name does not resolve, the
    connection dropped, or the server took longer than the timeout."""

    def __init__(self, message: str, url: str):
        super().__init__(message)
        self.message, self.url = message, url


class APITimeoutError(APIConnectionError):
    """The server accepted the connection but did not answer within the timeout."""


class APIStatusError(RayppError):
    """The server answered with an error status; the subclasses name the common ones."""

    def __init__(self, status_code: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None):
        super().__init__(f"{status_code}: {message}")
        self.status_code, self.message = status_code, message
        self.type, self.param, self.code = type, param, code
        self.retry_after_s = retry_after_s


class BadRequestError(APIStatusError):
    """400: invalid JSON, an unknown or invalid field (`param` names it), a prompt too long."""


class AuthenticationError(APIStatusError):
    """401: the server wants an API key (`api_key=` or RAYPP_API_KEY) and got none or another."""


class NotFoundError(APIStatusError):
    """404: an unknown model (`GET /v1/models` lists the served one) or route."""


class RateLimitError(APIStatusError):
    """429: the engine's waiting queue is full; `retry_after_s` is the server's Retry-After."""


class ServerError(APIStatusError):
    """5xx: the replica's workers died (503), or a raypp bug (500, see the replica's log)."""


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
              413: BadRequestError, 422: BadRequestError, 429: RateLimitError}


def retry_after_s(headers) -> float | None:
    """Retry-After in seconds, or None when absent or given as an HTTP date (raypp sends seconds)."""
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def status_error(status_code: int, body: bytes, headers) -> APIStatusError:
    """The exception for an error response; a body that is not OpenAI's shape becomes the message."""
    try:
        err = json.loads(body)["error"]
        message, type_, param, code = err["message"], err.get("type"), err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError):
        message, type_, param, code = body.decode(errors="replace").strip() or "(empty body)", None, None, None
    cls = ServerError if status_code >= 500 else _BY_STATUS.get(status_code, APIStatusError)
    return cls(status_code, message, type=type_, param=param, code=code, retry_after_s=retry_after_s(headers))


def stream_error(err: dict) -> APIStatusError:
    """An error sent as a stream's last event (the status line had gone out already)."""
    return ServerError(500, err.get("message", "the stream failed"), type=err.get("type"),
                       param=err.get("param"), code=err.get("code"))
