"""The server as `make serve` starts it (no flags but the port): a new user's first request,
the README's own example, must get the right answer."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.engine


def test_make_serve_answers_the_readme_example(default_model):
    from server_helpers import LiveServer

    with LiveServer() as server:  # compiled, default dtype, default LagKV settings
        body = {
            "model": "SmolLM2-135M-Instruct",
            "temperature": 0,
            "max_tokens": 32,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == (
            "The capital of France is Paris."
        )
        log = server.tail(400)
    assert "dtype float32 (CPU:" in log and "max_tokens cap 1024" in log
