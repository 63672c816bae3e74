"""Bearer-token auth for ``/v1/*`` with OpenAI-shaped errors (vLLM's own answers
``{"error": "Unauthorized"}``, which OpenAI clients cannot parse). Probes and metrics stay open."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED_PREFIX = "/v1"


def openai_error(message: str, status: int, code: str | int | None) -> dict:
    """OpenAI's error body; the type follows the status as OpenAI's does (4xx: the request)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def send_openai_error(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    code: str | int | None,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer an ASGI request with an OpenAI error object (what middleware that stops a request
    before vLLM's handlers sends)."""
    response = JSONResponse(openai_error(message, status, code), status, headers=headers)
    await response(scope, receive, send)


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            return await self.app(scope, receive, send)
        if scope.get("method") == "OPTIONS":  # CORS preflight carries no credentials
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = (
            "Missing API key: send 'Authorization: Bearer <key>'"
            if not given
            else "Incorrect API key provided"
        )
        await send_openai_error(
            scope, receive, send, 401, message, "invalid_api_key", {"www-authenticate": "Bearer"}
        )
