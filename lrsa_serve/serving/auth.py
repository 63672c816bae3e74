"""Bearer-token auth for ``/v1/*`` with OpenAI-shaped errors (vLLM's own answers
``{"error": "Unauthorized"}``, which OpenAI clients cannot parse). Probes and metrics stay open."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED_PREFIX = "/v1"


def openai_error(message: str, type_: str, code: str | int | None, status: int) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


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
        body = json.dumps(
            openai_error(message, "invalid_request_error", "invalid_api_key", 401)
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
