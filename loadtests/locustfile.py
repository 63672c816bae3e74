"""Load test for an lrsa-serve (or any vLLM OpenAI-compatible) server: streaming chat and
completion requests with short prompts and long ones that cross several LagKV partitions.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000            # web UI
    locust --config loadtests/ci.conf --host http://127.0.0.1:8000            # CI profile
    locust --config loadtests/soak.conf --host http://127.0.0.1:8000          # soak profile

The API key comes from --api-key or LRSA_API_KEY. Only loopback hosts are accepted unless
--allow-remote is given (see hosts.py).

What is recorded, besides each request's own row (time to response headers):
  TTFT  <name>   time to the first generated text in the stream
  ITL   <name>   every gap between two consecutive text chunks (one chunk is one token in vLLM)
  E2E   <name>   whole request, first byte sent to [DONE]; its "size" is the completion tokens
A request fails (and fails the run: locust exits 1) on any non-200, a line that is not SSE
`data: ...`, a JSON error, an `error` event, data after [DONE], a missing [DONE], no text, a
missing usage chunk, a completion shorter than max_tokens (ignore_eos is set), or a "long" prompt
that did not cross S + 3L tokens.

Long prompts: sink S and lag L come from the server's /v1/models card ("lagkv"); the prompt is
sized to S + 4.5 L tokens (capped by max_model_len) with the server's /tokenize, so at least three
full partitions are compressed while it is prefilled; prompt_tokens is checked on every request.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any

import requests
from hosts import HostNotAllowed, check_target
from locust import HttpUser, between, events, task
from locust.exception import StopUser

from lrsa_serve import lagkv
from lrsa_serve.config import LagKVConfig

log = logging.getLogger("lrsa-loadtest")

WORDS = (
    "amber basil cedar delta ember fjord grove harbor iris juniper kestrel lagoon meadow nectar "
    "orchid pebble quartz river saffron tundra umber valley willow xenon yarrow zephyr"
).split()


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    # On the parser itself: locust's own options (is_secret, env_var) only exist there.
    group = parser
    group.add_argument("--api-key", env_var="LRSA_API_KEY", default="", is_secret=True,
                       help="bearer key of the server (env LRSA_API_KEY)")  # fmt: skip
    group.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    group.add_argument("--allow-remote", action="store_true", default=False,
                       help="allow a non-loopback --host (your own deployment)")  # fmt: skip
    group.add_argument("--request-timeout", type=float, default=300, help="seconds per request")


class Server:
    """What every user needs to know about the server, fetched once per locust process."""

    lock = threading.Lock()
    info: dict[str, Any] | None = None

    @classmethod
    def get(cls, host: str, headers: dict[str, str]) -> dict[str, Any]:
        with cls.lock:
            if cls.info is None:
                cls.info = cls.fetch(host, headers)
            return cls.info

    @staticmethod
    def fetch(host: str, headers: dict[str, str]) -> dict[str, Any]:
        models = requests.get(f"{host}/v1/models", headers=headers, timeout=30)
        models.raise_for_status()
        card = models.json()["data"][0]
        section = card.get("lagkv") or {"sink": 0, "lag": 256}  # LagKV off: still "long"
        fields = {k: v for k, v in section.items() if k in LagKVConfig.model_fields}
        rule = LagKVConfig.build(**fields).rule
        max_len = int(card.get("max_model_len") or 8192)

        def count(text: str) -> int:
            body = {"model": card["id"], "prompt": text, "add_special_tokens": False}
            r = requests.post(f"{host}/tokenize", json=body, headers=headers, timeout=30)
            r.raise_for_status()
            return int(r.json()["count"])

        sample = long_text(random.Random(0), 200)
        per_sentence = count(sample) / 200
        return {
            "model": card["id"],
            "max_model_len": max_len,
            # A long prompt must cross the start of partition 3 (two partitions compressed) and
            # is sized to S + 4.5L (three compressed, the fourth half full).
            "long_min_tokens": lagkv.partition_start(3, rule),
            "long_tokens": lagkv.partition_start(4, rule) + rule.lag // 2,
            "tokens_per_sentence": per_sentence,
        }


def long_text(rng: random.Random, sentences: int) -> str:
    """Filler that differs per request (no two long prompts share a prefix)."""
    return " ".join(
        f"Note {i}: the {rng.choice(WORDS)} {rng.choice(WORDS)} stays near {rng.randint(0, 9999)}."
        for i in range(sentences)
    )


class Malformed(Exception):
    """The stream broke the OpenAI SSE contract."""


class LagKVUser(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        key = getattr(options, "api_key", "") if options else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.max_tokens = getattr(options, "max_tokens", 32) if options else 32
        self.timeout = getattr(options, "request_timeout", 300) if options else 300
        allow_remote = getattr(options, "allow_remote", False) if options else False
        try:
            check_target(self.host, allow_remote)  # also when the host came from the web UI
            self.server = Server.get(self.host, self.headers)
            s = self.server
            want = s["long_tokens"]
            room = s["max_model_len"] - self.max_tokens - 64  # chat template and margin
            if min(want, room) <= s["long_min_tokens"]:
                raise ValueError(
                    f"max_model_len {s['max_model_len']} leaves no room for a prompt of more "
                    f"than S + 3L = {s['long_min_tokens']} tokens"
                )
            self.long_sentences = int(min(want, room) / s["tokens_per_sentence"])
        except (HostNotAllowed, requests.RequestException, KeyError, ValueError) as e:
            # Not a request failure: the test cannot run at all. Say so and end with an error.
            log.error("cannot load this server: %s", e)
            self.environment.process_exit_code = 1
            self.environment.runner.quit()
            raise StopUser() from e
        self.rng = random.Random()

    # ---- prompts ----
    def long_prompt(self) -> str:
        return long_text(self.rng, self.long_sentences)

    def body(self, chat: bool, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.server["model"],
            "max_tokens": self.max_tokens,
            "temperature": 0.7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # a fixed number of tokens: comparable runs
        }
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    # ---- tasks ----
    @task(3)
    def chat_short(self) -> None:
        topic = self.rng.choice(WORDS)
        self.stream(True, f"Write two sentences about the colour {topic}.", "chat short")

    @task(2)
    def chat_long(self) -> None:
        prompt = self.long_prompt() + "\n\nWhich note number mentions a harbor first?"
        self.stream(True, prompt, "chat long", long=True)

    @task(2)
    def completion_short(self) -> None:
        self.stream(False, f"Once upon a time, a {self.rng.choice(WORDS)}", "completion short")

    @task(1)
    def completion_long(self) -> None:
        self.stream(False, self.long_prompt() + "\nSummary:", "completion long", long=True)

    # ---- one streamed request, checked and timed ----
    def stream(self, chat: bool, prompt: str, name: str, long: bool = False) -> None:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        start = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        with self.client.post(
            path,
            json=self.body(chat, prompt),
            headers=self.headers,
            stream=True,
            catch_response=True,
            name=name,
            timeout=self.timeout,
        ) as response:
            try:
                if response.status_code != 200:
                    raise Malformed(f"HTTP {response.status_code}: {response.text[:300]}")
                done, usage, finish = False, None, None
                for raw in response.iter_lines():
                    if not raw:
                        continue  # SSE event separator
                    line = raw.decode("utf-8")
                    if done:
                        raise Malformed(f"data after [DONE]: {line[:100]}")
                    if not line.startswith("data: "):
                        raise Malformed(f"not an SSE data line: {line[:100]}")
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise Malformed(f"error event: {chunk['error']}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk["choices"]:
                        text = choice["delta"].get("content") if chat else choice["text"]
                        finish = choice.get("finish_reason") or finish
                        if text:
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
                if not done:
                    raise Malformed("stream ended without data: [DONE]")
                if first is None:
                    raise Malformed("no text in the stream")
                if usage is None:
                    raise Malformed("no usage chunk (stream_options.include_usage)")
                if usage["completion_tokens"] != self.max_tokens or finish != "length":
                    raise Malformed(f"{usage['completion_tokens']} tokens, finish {finish}")
                if long and usage["prompt_tokens"] <= self.server["long_min_tokens"]:
                    raise Malformed(
                        f"long prompt of {usage['prompt_tokens']} tokens does not cross "
                        f"S + 3L = {self.server['long_min_tokens']}"
                    )
            except (Malformed, ValueError, KeyError, TypeError, AttributeError) as e:
                response.failure(f"{type(e).__name__}: {e}")
                return
            except requests.RequestException as e:  # connection reset, chunked encoding
                response.failure(f"{type(e).__name__}: {e}")
                return
            response.success()
        end = time.perf_counter()
        fire = self.environment.events.request.fire
        fire(request_type="TTFT", name=name, response_time=(first - start) * 1000,
             response_length=0, exception=None, context={})  # fmt: skip
        for gap in gaps:
            fire(request_type="ITL", name=name, response_time=gap * 1000, response_length=0,
                 exception=None, context={})  # fmt: skip
        fire(request_type="E2E", name=name, response_time=(end - start) * 1000,
             response_length=usage["completion_tokens"], exception=None, context={})  # fmt: skip


@events.init.add_listener
def refuse_remote_hosts(environment, **_kw) -> None:
    options = environment.parsed_options
    if options is None:
        return
    try:
        check_target(environment.host or options.host, options.allow_remote)
    except HostNotAllowed as e:
        log.error("%s", e)
        raise SystemExit(2) from None
