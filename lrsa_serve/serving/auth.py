"""Bearer-token auth for the whole app, deny by default, with OpenAI-shaped errors (vLLM's own
check answers ``{"error": "Unauthorized"}``, which OpenAI clients cannot parse).

With a key set, every request needs ``Authorization: Bearer <key>`` except the probes in
``OPEN_PROBES``, which load balancers, Kubernetes and Prometheus call without credentials. The
check sits in front of the router, so a route that a future vLLM adds is covered without a code
change. ``/openapi.json``, ``/docs`` and ``/redoc`` are not probes: the schema lists every route
and its parameters, which no probe needs, so it is served to key holders only.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Path -> methods answered without a key. POST /ping is SageMaker's probe form of GET /ping.
OPEN_PROBES: dict[str, frozenset[str]] = {
    "/health": frozenset({"GET", "HEAD"}),
    "/ready": frozenset({"GET", "HEAD"}),
    "/ping": frozenset({"GET", "HEAD", "POST"}),
    "/metrics": frozenset({"GET", "HEAD"}),
    "/version": frozenset({"GET", "HEAD"}),
}


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


def _app_path(scope: Scope) -> str:
    """The path the router matches: behind ``--root-path`` the prefix is not part of it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _is_cors_preflight(scope: Scope) -> bool:
    # Browsers send preflights without credentials; CORS middleware answers them, no handler runs.
    headers = dict(scope["headers"])
    return (
        scope.get("method") == "OPTIONS"
        and b"origin" in headers
        and b"access-control-request-method" in headers
    )


class BearerAuth:
    """ASGI middleware: 401 (OpenAI error object) for every HTTP request without the key, except
    ``open_probes``; websockets need the key too (closed before accept)."""

    def __init__(
        self, app: ASGIApp, api_key: str, open_probes: dict[str, frozenset[str]] = OPEN_PROBES
    ) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_probes = open_probes

    def _is_open(self, scope: Scope) -> bool:
        methods = self.open_probes.get(_app_path(scope))
        return (methods is not None and scope.get("method") in methods) or _is_cors_preflight(scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        if self._is_open(scope):
            return await self.app(scope, receive, send)
        message = (
            "Missing API key: send 'Authorization: Bearer <key>'"
            if not given
            else "Incorrect API key provided"
        )
        await send_openai_error(
            scope, receive, send, 401, message, "invalid_api_key", {"www-authenticate": "Bearer"}
        )
