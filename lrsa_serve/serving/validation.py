"""Request checks for inputs that vLLM accepts but then fails on with a 500.

``POST /v1/responses``: vLLM turns an assistant output message of the ``input`` list into chat
text by reading ``content[0].text``, so a message whose content is empty or starts with a
``refusal`` part raises inside vLLM (found by the schemathesis test). Such input is answered
with a 400 OpenAI error naming the item, before it reaches vLLM.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lrsa_serve.serving.auth import send_openai_error

RESPONSES_PATH = "/v1/responses"


def responses_input_problem(body: Any) -> str | None:
    """Why vLLM cannot take this /v1/responses body, or None (vLLM validates the rest)."""
    items = body.get("input") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return None
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("role") != "assistant":
            continue
        content = item.get("content")
        if not isinstance(content, list):
            continue
        first = content[0] if content else None
        if first is None or (isinstance(first, dict) and first.get("type") == "refusal"):
            return (
                f"input[{i}]: an assistant message must start with a text part "
                "(empty content and leading refusal parts are not supported)"
            )
    return None


class ResponsesInputCheck:
    """Pure ASGI: buffers the body of POST /v1/responses, checks it, and replays it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope["path"].rstrip("/") != RESPONSES_PATH
        ):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        try:
            problem = responses_input_problem(json.loads(raw))
        except ValueError:  # not JSON: vLLM answers that with its own 400
            problem = None
        if problem is not None:
            return await send_openai_error(scope, receive, send, 400, problem, 400)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
