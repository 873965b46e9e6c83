"""Optional bearer-key check for /v1/*, as plain ASGI middleware.

The key comes from `serve.api_key` in the deployment args or the RAYPP_API_KEY
environment variable.  /health, /docs and /openapi.json stay open (probes and humans).
It is plain ASGI rather than Starlette's BaseHTTPMiddleware on purpose: the latter
wraps streaming responses in its own task and delays the client-disconnect signal
that aborts a request.
"""
from __future__ import annotations

import hmac

from raypp.serve.errors import error_response


class APIKeyMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope).startswith("/v1/"):
            key = getattr(scope["app"].state, "api_key", None) if "app" in scope else None
            if key and not _authorized(scope, key):
                resp = error_response(401, "Missing or incorrect API key: send `Authorization: Bearer <key>` "
                                           "(the key set by serve.api_key or RAYPP_API_KEY).",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    """The path inside this app: Serve mounts an app under its route_prefix (the ASGI root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _authorized(scope, key: str) -> bool:
    """Compares in constant time (hmac.compare_digest) so that response timing does not leak how
    much of a guessed key was right; bytes on both sides, so any key, ASCII or not, can match."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode("utf-8"))
    return False
