"""Asking the items: against OpenAI-compatible endpoints (HTTP) or in-process vLLM engines.

A target is one (model, LagKV setting) pair. An HTTP target reads its setting from the server's
``/v1/models`` card (``"lagkv"``: the settings, or null for an uncompressed server); an engine
target is built here with the setting it is given, one engine at a time. Every request ends in an
``Answer``: the text, or an error message. Nothing a server returns (500s, timeouts, bodies that
are not JSON or lack the fields) raises out of here; it becomes a failure in the report.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lrsa_serve.config import LagKVConfig
from lrsa_serve.eval.scoring import score_response
from lrsa_serve.eval.tasks import EvalItem

Progress = Callable[[int, int], None]  # (requests done, of which failed) since the last call


def setting_label(lagkv: dict | None, known: bool = True) -> str:
    if not known:
        return "unknown"
    if lagkv is None:
        return "dense"
    ratio = lagkv.get("ratio")
    ratio = f"{ratio:g}" if isinstance(ratio, int | float) else ratio
    return f"S{lagkv.get('sink')} L{lagkv.get('lag')} r{ratio}"


@dataclass
class TargetInfo:
    """What a result row is labelled with; ``name`` is unique within a run."""

    name: str
    kind: str  # "http" or "engine"
    model: str | None
    lagkv: dict | None  # LagKV settings; None = no compression (when lagkv_known)
    lagkv_known: bool = True  # False: the server's card did not say (not an lrsa server?)
    url: str | None = None
    max_model_len: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def setting(self) -> str:
        return setting_label(self.lagkv, self.lagkv_known)

    @property
    def kept_ratio(self) -> float | None:
        """Kept fraction per partition: 1.0 uncompressed, None when unknown."""
        if not self.lagkv_known:
            return None
        if self.lagkv is None:
            return 1.0
        ratio = self.lagkv.get("ratio")  # a card from another server may say anything
        return float(ratio) if isinstance(ratio, int | float) else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"setting": self.setting, "kept_ratio": self.kept_ratio}


@dataclass(frozen=True)
class Answer:
    text: str | None
    error: str | None
    seconds: float


@dataclass(frozen=True)
class ItemResult:
    target: str
    item: EvalItem
    answer: Answer
    score: float
    exact: bool

    @property
    def failed(self) -> bool:
        return self.answer.error is not None

    def to_dict(self) -> dict[str, Any]:
        example = self.item.example
        return {
            "target": self.target,
            "id": self.item.id,
            "task": self.item.task,
            "length": self.item.length,
            "depth": self.item.depth,
            "seed": example.seed,
            "expected": list(self.item.expected),
            "response": self.answer.text,
            "error": self.answer.error,
            "score": self.score,
            "exact": self.exact,
            "seconds": round(self.answer.seconds, 3),
        }


def grade(target: str, item: EvalItem, answer: Answer) -> ItemResult:
    if answer.error is not None or answer.text is None:
        return ItemResult(target, item, answer, 0.0, False)
    scored = score_response(answer.text, item.expected)
    return ItemResult(target, item, answer, scored.score, scored.exact)


# ---- HTTP ---------------------------------------------------------------------------------------
def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_detail(response: Any) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return _short(response.text) or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return _short(error["message"])
        if isinstance(error, str):
            return _short(error)
        if body.get("detail"):
            return _short(body["detail"])
    return _short(response.text)


def parse_completion(body: Any, api: str) -> str:
    """The generated text of an OpenAI response body; ValueError says what is wrong with it."""
    if not isinstance(body, dict):
        raise ValueError(f"malformed response: a JSON {type(body).__name__}, not an object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("malformed response: no choices")
    choice = choices[0]
    if api == "chat":
        message = choice.get("message")
        if not isinstance(message, dict):
            raise ValueError("malformed response: choices[0] has no message")
        content = message.get("content")
        text = "" if content is None else content  # null content: an empty answer, not an error
    else:
        text = choice.get("text")
    if not isinstance(text, str):
        field_name = "message.content" if api == "chat" else "text"
        raise ValueError(f"malformed response: choices[0].{field_name} is not a string")
    return text


class HTTPTarget:
    """An OpenAI-compatible server. ``name`` None: label by the server's LagKV setting."""

    def __init__(
        self,
        base_url: str,
        *,
        name: str | None = None,
        api_key: str | None = None,
        api: str = "completions",
        model: str | None = None,
        concurrency: int = 4,
        timeout: float = 600.0,
    ) -> None:
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else root + "/v1"
        self.api_key, self.api, self.model = api_key, api, model
        self.concurrency, self.timeout = max(1, concurrency), timeout
        self.root: str | None = None  # the server's model path, if it says
        self.info = TargetInfo(name or "", "http", model, None, False, url=self.base_url)
        self._named = name is not None
        self.prepared = False

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def prepare(self) -> None:
        """Read the model card; a server that cannot answer it is noted, not fatal (its
        requests will fail and be reported)."""
        import httpx

        if self.prepared:
            return
        self.prepared, card = True, None
        try:
            response = httpx.get(f"{self.base_url}/models", headers=self.headers(), timeout=30)
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}: {_error_detail(response)}")
            cards = response.json().get("data") or []
            if not isinstance(cards, list):
                raise ValueError("no model list")
            matching = [c for c in cards if isinstance(c, dict) and c.get("id") == self.model]
            card = (matching or [c for c in cards if isinstance(c, dict)] or [None])[0]
            if card is None:
                raise ValueError("the server lists no model")
        except (httpx.HTTPError, ValueError, AttributeError) as e:
            self.info.notes.append(f"could not read {self.base_url}/models: {_short(e)}")
        if card is not None:
            self.model = self.model or card.get("id")
            self.root = card.get("root")
            self.info.max_model_len = card.get("max_model_len")
            if "lagkv" in card:
                lagkv = card["lagkv"]
                self.info.lagkv = dict(lagkv) if isinstance(lagkv, dict) else None
                self.info.lagkv_known = True
        if not self.info.lagkv_known:
            self.info.notes.append("the server does not report LagKV settings (setting unknown)")
        self.info.model = self.model
        if not self._named:
            self.info.name = self.info.setting

    async def _ask(self, client: Any, item: EvalItem) -> Answer:
        import httpx

        prompt = item.example.prompt
        body: dict[str, Any] = {
            "model": self.model or "default",
            "max_tokens": item.max_tokens,
            "temperature": 0.0,
        }
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            path = "/chat/completions"
        else:
            body["prompt"] = prompt
            path = "/completions"
        started = time.perf_counter()

        def failed(message: str) -> Answer:
            return Answer(None, message, time.perf_counter() - started)

        try:
            response = await client.post(self.base_url + path, json=body)
        except httpx.TimeoutException:
            return failed(f"timeout after {self.timeout:g}s")
        except httpx.HTTPError as e:
            return failed(f"connection error: {_short(e) or type(e).__name__}")
        if response.status_code != 200:
            return failed(f"HTTP {response.status_code}: {_error_detail(response)}")
        try:
            text = parse_completion(response.json(), self.api)
        except ValueError as e:
            message = str(e)
            if not message.startswith("malformed"):  # json's own decode error
                message = f"malformed response: not JSON ({_short(response.text, 60)!r})"
            return failed(message)
        return Answer(text, None, time.perf_counter() - started)

    async def _ask_all(self, items: Sequence[EvalItem], progress: Progress) -> list[Answer]:
        import httpx

        limit = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency)

        async with httpx.AsyncClient(
            headers=self.headers(), timeout=self.timeout, limits=limits
        ) as client:

            async def one(item: EvalItem) -> Answer:
                async with limit:
                    answer = await self._ask(client, item)
                progress(1, answer.error is not None)
                return answer

            return list(await asyncio.gather(*(one(item) for item in items)))

    def run(self, items: Sequence[EvalItem], progress: Progress) -> list[Answer]:
        return asyncio.run(self._ask_all(items, progress))

    def close(self) -> None:
        pass


# ---- in-process engine --------------------------------------------------------------------------
class EngineTarget:
    """A vLLM engine in this process with ``settings`` (None: stock vLLM, no compression).

    Built in ``prepare`` and shut down in ``close``, unless an existing ``llm`` is handed in
    (built with ``settings``): then it is used as is and left running."""

    def __init__(
        self,
        model: str,
        settings: LagKVConfig | None,
        *,
        api: str = "completions",
        batch: int = 16,
        llm: Any = None,
        **engine_kwargs: Any,
    ) -> None:
        self.model, self.settings, self.api = model, settings, api
        self.batch, self.engine_kwargs = max(1, batch), engine_kwargs
        lagkv = settings.model_dump() if settings else None
        limit = engine_kwargs.get("max_model_len")
        self.info = TargetInfo(setting_label(lagkv), "engine", model, lagkv, max_model_len=limit)
        self.llm: Any = llm
        self.owns_engine = llm is None
        self.start_error: str | None = None
        self.prepared = llm is not None

    def prepare(self) -> None:
        """Start the engine. Settings that cannot work raise (a one-line CLI error); an engine
        that fails to start is recorded and fails every request of this target."""
        from lrsa_serve.engine.api import lagkv_engine_kwargs

        if self.prepared:
            return
        self.prepared = True
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # as make_llm: 4 GiB on CPU
        kwargs = lagkv_engine_kwargs(self.model, self.settings, **self.engine_kwargs)
        try:
            from vllm import LLM

            self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - any start failure is reported per request
            self.start_error = f"engine failed to start: {_short(e)}"
            self.info.notes.append(self.start_error)

    def _generate(self, chunk: Sequence[EvalItem]) -> list[str]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=0.0, max_tokens=item.max_tokens) for item in chunk]
        if self.api == "chat":
            conversations = [[{"role": "user", "content": item.example.prompt}] for item in chunk]
            outputs = self.llm.chat(conversations, params, use_tqdm=False)
        else:
            outputs = self.llm.generate(
                [item.example.prompt for item in chunk], params, use_tqdm=False
            )
        return [output.outputs[0].text for output in outputs]

    def _answer(self, chunk: Sequence[EvalItem]) -> list[Answer]:
        if self.llm is None:
            return [Answer(None, self.start_error or "no engine", 0.0)] * len(chunk)
        started = time.perf_counter()
        try:
            texts = self._generate(chunk)
        except Exception as e:  # noqa: BLE001 - a failed batch fails its requests only
            return [Answer(None, f"generation failed: {_short(e)}", 0.0)] * len(chunk)
        each = (time.perf_counter() - started) / len(chunk)
        return [Answer(text, None, each) for text in texts]

    def run(self, items: Sequence[EvalItem], progress: Progress) -> list[Answer]:
        answers: list[Answer] = []
        for start in range(0, len(items), self.batch):
            batch = self._answer(items[start : start + self.batch])
            answers += batch
            progress(len(batch), sum(answer.error is not None for answer in batch))
        return answers

    def close(self) -> None:
        if self.llm is not None and self.owns_engine:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()


# ---- a run --------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    config: dict[str, Any]
    targets: list[TargetInfo]
    items: list[EvalItem]
    results: list[ItemResult]

    @property
    def tasks(self) -> list[str]:
        """The tasks asked, in the run's order."""
        return list(dict.fromkeys(item.task for item in self.items))

    @property
    def lengths(self) -> list[int]:
        return sorted({item.length for item in self.items})

    def merged(self, other: EvalRun) -> EvalRun:
        """Both runs' targets and results (same items), e.g. base and trained model."""
        return EvalRun(
            self.config, self.targets + other.targets, self.items, self.results + other.results
        )


@dataclass(frozen=True)
class Cell:
    target: str
    task: str
    length: int | None  # None: every length
    n: int
    score: float
    exact: float
    failed: int


def cells(run: EvalRun) -> list[Cell]:
    """Per (target, task, length), then per (target, task) over lengths (length None), then per
    target over everything (task "mean"), in the run's order (``report`` describes a cell)."""
    groups: dict[tuple, list[ItemResult]] = defaultdict(list)
    for result in run.results:
        groups[(result.target, result.item.task, result.item.length)].append(result)
        groups[(result.target, result.item.task, None)].append(result)
        groups[(result.target, "mean", None)].append(result)
    out = []
    for (target, task, length), rows in groups.items():
        n = len(rows)  # at least 1: a group exists because a result joined it
        score, exact = sum(r.score for r in rows) / n, sum(r.exact for r in rows) / n
        out.append(Cell(target, task, length, n, score, exact, sum(r.failed for r in rows)))
    return out


def lookup(all_cells: Sequence[Cell]) -> dict[tuple, Cell]:
    return {(c.target, c.task, c.length): c for c in all_cells}


def run_targets(
    targets: Sequence[HTTPTarget | EngineTarget],
    items: Sequence[EvalItem],
    config: dict[str, Any],
    *,
    progress: bool = True,
) -> EvalRun:
    """Ask every item of every target, one target at a time (one engine alive at a time)."""
    from tqdm import tqdm

    results: list[ItemResult] = []
    infos: list[TargetInfo] = []
    with tqdm(
        total=len(items) * len(targets),
        desc="eval",
        unit="req",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        failures = 0

        def advance(done: int, failed: int) -> None:
            nonlocal failures
            failures += failed
            bar.update(done)
            if failures:
                bar.set_postfix(failed=failures, refresh=False)

        for target in targets:
            try:
                target.prepare()
                names = {info.name for info in infos}
                base, suffix = target.info.name, 2
                while target.info.name in names:  # two servers with one setting: keep both
                    target.info.name = f"{base} #{suffix}"
                    suffix += 1
                bar.set_description(f"eval {target.info.name}")
                answers = target.run(items, advance)
            finally:
                target.close()
            infos.append(target.info)
            results += [grade(target.info.name, i, a) for i, a in zip(items, answers, strict=True)]
    return EvalRun(dict(config), infos, list(items), results)
