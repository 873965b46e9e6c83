"""Make FastAPI's generated OpenAPI spec say what the server really does.

FastAPI documents a 422 for every body it validates; raypp answers 400 (OpenAI's
code) in OpenAI's error shape, so the 422 entries are replaced.  A streamed answer is
`text/event-stream` whose events are the *Chunk models; those schemas are added to the
components so the spec names them.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from raypp.serve import protocol as P

ERRORS = {
    400: "Invalid JSON, an invalid or unknown field, or prompt + max_tokens over the context length.",
    401: "Missing or wrong API key (only when one is configured).",
    404: "Unknown model.",
    413: "The request body is larger than the server's limit (8 MiB).",
    429: "The engine's waiting queue is full; retry after the Retry-After header's seconds.",
    503: "The replica's workers failed and cannot be rebuilt; retry after the Retry-After header's seconds.",
}


def error_responses(*codes: int) -> dict:
    return {c: {"model": P.ErrorResponse, "description": ERRORS[c]} for c in codes}


def streaming_200(model: type, chunk: type) -> dict:
    return {200: {"model": model, "description": (
        f"`{model.__name__}` as JSON, or with `stream: true` Server-Sent Events: each event is "
        f"`data: <{chunk.__name__} JSON>`, the last is `data: [DONE]`."),
        "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}}}}


def install(app: FastAPI) -> None:
    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for chunk in (P.CompletionChunk, P.ChatCompletionChunk):
            s = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(s.pop("$defs", {}))
            schemas[chunk.__name__] = s
        for path in spec.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
