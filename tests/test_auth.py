"""With an API key set, every route answers 401 without it except the documented probes.

Nothing here lists today's routes: the checks walk the app's router (mounts included) and its
OpenAPI schema, so a route a future vLLM adds is covered as it appears. The same app is built
in-process (no engine: auth answers before any handler) and served live by `lrsa serve`.
"""

from __future__ import annotations

import re

import httpx
import pytest
from starlette.routing import Mount
from starlette.testclient import TestClient

from lrsa_serve.config import LagKVConfig
from lrsa_serve.serving.auth import OPEN_PROBES, BearerAuth

KEY = "route-walk-secret"


def router_calls(app) -> set[tuple[str, str]]:
    """(method, path) of every route of the app, mounts included, path parameters filled."""
    calls = set()

    def walk(routes, prefix: str) -> None:
        for route in routes:
            path = prefix + getattr(route, "path", "")
            if isinstance(route, Mount):
                calls.update({("GET", path), ("POST", path), ("GET", path + "/")})
                walk(route.routes, path)
                continue
            for method in getattr(route, "methods", None) or {"GET"}:
                calls.add((method, path))

    walk(app.router.routes, "")
    return {(m, fill(p)) for m, p in calls}


def schema_calls(schema: dict) -> set[tuple[str, str]]:
    return {
        (method.upper(), fill(path))
        for path, operations in schema["paths"].items()
        for method in operations
        if method.upper() in {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"}
    }


def fill(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def is_probe(method: str, path: str) -> bool:
    return method in OPEN_PROBES.get(path, ())


def answers_without_key(request, calls) -> list[str]:
    """The non-probe calls that do not answer 401 with an OpenAI error object without the key,
    or with a wrong one."""
    leaks = []
    for method, path in sorted(calls):
        if is_probe(method, path):
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = request(method, path, headers=headers)
            if method == "HEAD" and response.status_code == 401:
                continue  # no body to check
            is_json = response.headers.get("content-type", "").startswith("application/json")
            refused = response.status_code == 401 and is_json
            error = response.json().get("error") if refused else None
            if not (isinstance(error, dict) and error.get("code") == "invalid_api_key"):
                leaks.append(f"{method} {path} -> {response.status_code}")
                break
    return leaks


def server_app(*flags: str, open_probes=OPEN_PROBES):
    """The app `lrsa serve --api-key KEY FLAGS` serves, built without an engine."""
    from lrsa_serve.serving.app import build_server_app
    from lrsa_serve.serving.cli import build_parser

    args = build_parser().parse_args(list(flags))
    app = build_server_app(args, ("generate",), None, None, LagKVConfig(), KEY)
    if open_probes is not OPEN_PROBES:  # rebuild the stack with another allow-list
        for middleware in app.user_middleware:
            if middleware.cls is BearerAuth:
                middleware.kwargs["open_probes"] = open_probes
        app.middleware_stack = app.build_middleware_stack()
    return app


def all_calls(app) -> set[tuple[str, str]]:
    return router_calls(app) | schema_calls(app.openapi())


@pytest.fixture(scope="module")
def app():
    return server_app()


def test_every_route_but_the_probes_needs_the_key(app):
    client = TestClient(app, raise_server_exceptions=False)
    calls = all_calls(app)
    assert len(calls) > 20 and ("POST", "/v1/chat/completions") in calls
    assert answers_without_key(client.request, calls) == []


def test_the_key_opens_every_route(app):
    client = TestClient(app, raise_server_exceptions=False)
    headers = {"Authorization": f"Bearer {KEY}"}
    refused = [
        f"{m} {p}" for m, p in sorted(all_calls(app))
        if client.request(m, p, headers=headers).status_code == 401
    ]  # fmt: skip
    assert refused == []


def test_the_walk_finds_a_route_left_open():
    # The same walk over an app whose allow-list also opens /tokenize must report exactly it.
    leaky = server_app(open_probes=OPEN_PROBES | {"/tokenize": frozenset({"POST"})})
    client = TestClient(leaky, raise_server_exceptions=False)
    leaks = answers_without_key(client.request, all_calls(leaky))
    assert [leak.split(" -> ")[0] for leak in leaks] == ["POST /tokenize"]


def test_probes_and_cors_preflight_stay_open(app):
    client = TestClient(app, raise_server_exceptions=False)
    for path, methods in OPEN_PROBES.items():
        for method in methods:
            assert client.request(method, path).status_code != 401, (method, path)
    preflight = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    assert client.options("/v1/chat/completions", headers=preflight).status_code != 401
    assert client.options("/v1/chat/completions").status_code == 401  # not a preflight


def test_schema_and_docs_need_the_key(app):
    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_probes_behind_a_root_path():
    client = TestClient(server_app("--root-path", "/api"), raise_server_exceptions=False)
    assert client.get("/api/health").status_code != 401
    assert client.get("/api/tokenize").status_code == 401


def test_deployment_routes_are_off_unless_enabled(app):
    from lrsa_serve.serving.app import is_admin_route

    assert not any(is_admin_route(r) for r in app.router.routes)
    client = TestClient(app, raise_server_exceptions=False)
    headers = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/scale_elastic_ep", headers=headers).status_code == 404
    assert client.post("/is_scaling_elastic_ep", headers=headers).status_code == 404

    enabled = server_app("--enable-admin-routes")
    admin = [r.path for r in enabled.router.routes if is_admin_route(r)]
    assert "/scale_elastic_ep" in admin and "/is_scaling_elastic_ep" in admin
    client = TestClient(enabled, raise_server_exceptions=False)
    assert answers_without_key(client.request, all_calls(enabled)) == []
    assert client.post("/is_scaling_elastic_ep", headers=headers).status_code != 404


@pytest.mark.engine
def test_live_server_walk(live_server):
    """The running server: its own schema and the router of the app `lrsa serve` builds."""
    key = {"Authorization": f"Bearer {live_server.api_key}"}
    assert httpx.get(f"{live_server.url}/openapi.json").status_code == 401
    schema = httpx.get(f"{live_server.url}/openapi.json", headers=key).json()
    calls = schema_calls(schema) | router_calls(server_app())
    assert ("POST", "/invocations") in calls and ("POST", "/tokenize") in calls

    def request(method, path, headers):
        return httpx.request(method, live_server.url + path, headers=headers, timeout=30)

    assert answers_without_key(request, calls) == []
    for path in ("/health", "/ready", "/ping", "/metrics", "/version"):
        assert httpx.get(live_server.url + path, timeout=30).status_code == 200, path
