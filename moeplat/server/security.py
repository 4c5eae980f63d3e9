"""The server's guards: bearer token, request size limit, and no traceback ever reaches a client.

Token: with `settings.token` set, every /api request but GET /api/health needs
`Authorization: Bearer <token>` (compared in constant time). The log stream also takes
`?access_token=` because a browser's EventSource cannot send headers. `moeplat serve` refuses to
listen beyond loopback without a token (`check_exposure`).
"""

from __future__ import annotations

import logging
import secrets

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeplat.server.settings import ServerSettings

log = logging.getLogger("moeplat.server")
OPEN_PATHS = ("/api/health",)
QUERY_TOKEN_SUFFIX = "/log/stream"


class ExposedWithoutToken(Exception):
    pass


def check_exposure(settings: ServerSettings) -> None:
    if not settings.loopback and not settings.token:
        raise ExposedWithoutToken(
            f"refusing to listen on {settings.host} without a token: anyone who can reach it could "
            "run jobs. Set MOEPLAT_TOKEN (or --token), or listen on 127.0.0.1."
        )


def _bearer(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _query_token(scope: Scope) -> str | None:
    from urllib.parse import parse_qs

    if not scope.get("path", "").endswith(QUERY_TOKEN_SUFFIX):
        return None
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("access_token")
    return values[0] if values else None


class Guard:
    """ASGI middleware: token check on /api, then the request body limit (Content-Length up
    front, and counted while a chunked body arrives)."""

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, token = scope.get("path", ""), self.settings.token
        if token and path.startswith("/api") and path not in OPEN_PATHS:
            given = _bearer(scope) or _query_token(scope) or ""
            if not secrets.compare_digest(given.encode(), token.encode()):
                return await _reply(
                    scope, receive, send, 401, "missing or wrong token (Authorization: Bearer ...)"
                )
        limit = self.settings.max_request_bytes
        too_large = f"request body larger than the limit of {limit} bytes"
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(scope, receive, send, 400, "malformed Content-Length")
            if int(length) > limit:
                return await _reply(scope, receive, send, 413, too_large)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted, send)


async def _reply(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)


class RequestModel(BaseModel):
    """A request body: unknown keys are errors, and so is text that cannot be stored (JSON may
    carry lone surrogates such as "\\udfff", which no database or file encoding takes)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _encodable(cls, value):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(
                        f"not encodable as UTF-8 (a lone surrogate at character {e.start})"
                    ) from None
        return value


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """The catch-all: the traceback goes to the server log, the client learns nothing about it."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error, see the server log"}, status_code=500)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without echoing the input back (it may be huge, or not encodable)."""
    errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)
