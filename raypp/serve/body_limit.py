"""Request bodies over MAX_BODY_BYTES get 413 before any of them is parsed, as plain ASGI.

Without a cap, one client could make the replica buffer and parse an arbitrarily large
JSON document on the event loop every stream shares.  The largest useful request is a
batch of full-context prompts as token ids (64 x 8k ids, ~3 MiB of JSON), hence 8 MiB.
The body is read here (stopping as soon as it is too large, whatever Content-Length
claims) and replayed to the app; after it, `receive` is the server's own again, so a
client disconnect still reaches a streaming response.
"""
from __future__ import annotations

from raypp.serve.errors import error_response

MAX_BODY_BYTES = 8 * 1024 * 1024


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        resp = error_response(413, f"request body is larger than {self.max_bytes} bytes (the server's limit)",
                              code="request_too_large")
        await resp(scope, receive, send)
