"""Property-based fuzzing of the live server against its own OpenAPI schema: no input may make
it answer 5xx. Bounded: a few examples per operation, and generation kept short (max_tokens,
n) so the whole run stays within minutes on 2 CPU cores.

Deterministic by default (the same examples every run: CI must not fail on a draw);
``LRSA_FUZZ_RANDOM=1`` draws fresh examples, ``LRSA_FUZZ_EXAMPLES`` sets how many per operation.
A random run found the /v1/responses 500 that ``serving/validation.py`` now answers with a 400."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

pytestmark = pytest.mark.engine

RANDOM = os.environ.get("LRSA_FUZZ_RANDOM") == "1"
EXAMPLES = int(os.environ.get("LRSA_FUZZ_EXAMPLES", "6"))

LIMITS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "n": 2,
          "best_of": 2, "logprobs": 2, "top_logprobs": 2, "prompt_logprobs": 2}  # fmt: skip

# The field that bounds generation, per generating path (the Responses API names it differently).
LENGTH_FIELD = {"/v1/chat/completions": "max_tokens", "/v1/chat/completions/batch": "max_tokens",
                "/v1/completions": "max_tokens", "/v1/messages": "max_tokens",
                "/v1/responses": "max_output_tokens"}  # fmt: skip
LENGTH_FIELDS = {"max_tokens", "max_completion_tokens", "max_output_tokens"}


def bounded(path: str, body):
    """Clamp what would make one request slow (long or many generations): an absent length
    field means "up to the context length", minutes on 2 cores."""
    if isinstance(body, dict):
        field = LENGTH_FIELD.get(path)
        if field and not any(isinstance(body.get(k), int) for k in LENGTH_FIELDS):
            body[field] = 4
        for key, cap in LIMITS.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[key] = cap
    return body


def test_no_input_makes_the_server_fail(live_server):
    # schemathesis' own pytest plugin does not load under this pytest; its Python API does.
    schema = schemathesis.openapi.from_url(
        f"{live_server.url}/openapi.json", headers=live_server.headers()
    )
    failures, calls = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, derandomize=not RANDOM, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
        def fuzz(case):
            case.body = bounded(case.path, case.body)
            response = case.call(headers=live_server.headers(), timeout=60)
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.300} -> "
                                f"{response.status_code} {response.text[:300]}")  # fmt: skip

        fuzz()
    assert len(calls) > 50
    assert not failures, "\n".join(failures[:20])


def test_server_still_healthy_after_fuzzing(live_server):
    assert httpx.get(f"{live_server.url}/health").status_code == 200
