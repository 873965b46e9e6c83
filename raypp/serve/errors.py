"""Every failure leaves the server as OpenAI's error shape: {"error": {message, type, param, code}}.

Clients (the `openai` SDK included) read `error.message` and the status code; they
must never see a traceback or a bare 500 for input they can fix.  Bad input -> 400
naming the field, missing/wrong key -> 401, unknown model or route -> 404, body over
the limit -> 413, full queue -> 429 with Retry-After, dead engine -> 503 with
Retry-After.  A 500 means a raypp bug: its body says only that, and the traceback goes
to the replica's log.
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, headers=self.headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


def sse_error(err: APIError) -> bytes:
    """An error after the stream's headers went out can only be a last event."""
    return f"data: {json.dumps(error_body(err.status, err.message, param=err.param, code=err.code))}\n\n".encode()


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; pydantic's union branch names are dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in _TYPE_NAMES):
            continue  # e.g. 'str', 'list[int]', 'function-after[...]': which union branch pydantic tried
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        e = next(e for e in errors if e.get("type") == "json_invalid")
        detail = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return f"Request body is not valid JSON: {detail}", None
    parts, first_param = [], None
    for e in errors:
        param = _param(tuple(e.get("loc", ())))
        first_param = first_param or param
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (not part of the API)"
        elif e.get("type") == "missing":
            msg = "field required"
        parts.append(f"{param or 'body'}: {msg}")
    # A union mismatch reports once per branch; keep the first of each distinct line.
    return "; ".join(dict.fromkeys(parts)), first_param


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # FastAPI turns a body json.loads could not parse other than by JSONDecodeError (only
        # recursion depth) into "There was an error parsing the body"; say what it was.
        if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
            message = "Request body is not valid JSON: nested too deeply"
        elif exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        # Starlette re-raises after this response is sent, so Serve logs the traceback once.
        return error_response(500, "internal server error (a raypp bug; the replica log has the details)",
                              code="internal_error")
