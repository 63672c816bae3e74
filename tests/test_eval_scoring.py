"""lrsa eval's scoring on hand-made responses, its task grid and RULER-style generators, and the
report's tables and failure summaries (no model, no server; the session tokenizer
fixture is the default model's)."""

from __future__ import annotations

from collections import Counter

import pytest

from lrsa_serve.eval import ruler
from lrsa_serve.eval.report import failures, table_rows, text_table
from lrsa_serve.eval.runner import (
    Answer,
    EvalRun,
    TargetInfo,
    cells,
    grade,
    lookup,
    parse_completion,
)
from lrsa_serve.eval.scoring import normalize, recalled, score_response
from lrsa_serve.eval.tasks import build_items, expected_values, item_seed, resolve_tasks
from lrsa_serve.synthetic_tasks import EVAL_SEED_OFFSET, TASKS


# ---- scoring ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response, value, hit",
    [
        (" 59682. Remember it.", "59682", True),
        ("The pass key is 59682", "59682", True),
        ("596821", "59682", False),  # a longer number is not the key
        ("159682", "59682", False),
        ("5968", "59682", False),
        ("the value is DB4FDDBE.", "db4fddbe", True),  # case-insensitive
        ("var qpqsw, var memhl", "QPQSW", True),
        ("QPQSWX", "QPQSW", False),
        ("1,486,626 and 8811851", "1486626", True),  # digit-group separators dropped
        ("  new\n\tyork  city ", "New York city", True),  # whitespace runs normalised
        ("", "59682", False),
        ("anything", "", False),  # an empty expected value is never recalled
    ],
)
def test_recalled(response, value, hit):
    assert recalled(value, response) is hit


def test_normalize():
    assert normalize("  A\u00a0 B\n\nC ") == "a b c"  # NFKC turns the no-break space into a space
    assert normalize("1,234,567 vs 12,34") == "1234567 vs 12,34"


def test_single_value_is_all_or_nothing():
    assert score_response("The special magic number is 7197059.", ["7197059"]).score == 1.0
    wrong = score_response("The special magic number is 1926526.", ["7197059"])
    assert (wrong.score, wrong.exact, wrong.missing) == (0.0, False, ("7197059",))


def test_multi_value_partial_credit():
    expected = ["1486626", "8811851", "5178410", "1869953"]
    three = score_response("1486626, 8811851 and 1869953", expected)
    assert three.score == 0.75 and not three.exact and three.missing == ("5178410",)
    all_four = score_response("5178410 1869953 1486626 8811851 (any order)", expected)
    assert all_four.score == 1.0 and all_four.exact
    assert score_response("no numbers here", expected).score == 0.0


def test_variable_tracking_and_common_words_split_into_values():
    assert expected_values("QPQSW MEMHL FXWGF", multi_value=True) == ("QPQSW", "MEMHL", "FXWGF")
    assert expected_values("a b", multi_value=False) == ("a b",)
    names = expected_values("QPQSW MEMHL FXWGF LRWJI", multi_value=True)
    assert score_response("VAR qpqsw, VAR Memhl", names).score == 0.5


def test_failed_request_scores_zero(tokenizer):
    item = build_items(tokenizer, resolve_tasks(["passkey"]), [300], [0.5], 1)[0]
    failed = grade("t", item, Answer(None, "HTTP 500: boom", 0.1))
    assert failed.failed and failed.score == 0.0 and not failed.exact
    right = grade("t", item, Answer(f" {item.example.answer}.", None, 0.1))
    assert not right.failed and right.score == 1.0 and right.exact


@pytest.mark.parametrize(
    "body, api, message",
    [
        ({"choices": [{"text": " 123"}]}, "completions", None),
        ({"choices": [{"message": {"content": "123"}}]}, "chat", None),
        ({"choices": [{"message": {"content": None}}]}, "chat", None),  # empty answer
        ([1, 2], "completions", "a JSON list"),
        ({"choices": []}, "completions", "no choices"),
        ({"object": "error"}, "completions", "no choices"),
        ({"choices": [{"text": 5}]}, "completions", "choices[0].text is not a string"),
        ({"choices": [{"text": "x"}]}, "chat", "has no message"),
    ],
)
def test_parse_completion(body, api, message):
    if message is None:
        assert isinstance(parse_completion(body, api), str)
    else:
        with pytest.raises(ValueError, match="malformed response") as error:
            parse_completion(body, api)
        assert message in str(error.value)


# ---- tasks --------------------------------------------------------------------------------------
def test_task_registry_has_training_and_ruler_tasks():
    names = [spec.name for spec in resolve_tasks(["all"])]
    assert set(TASKS) <= set(names) and set(ruler.RULER_TASKS) <= set(names)
    assert [s.name for s in resolve_tasks(["qa"])] == list(TASKS)  # the training generator's
    assert [s.name for s in resolve_tasks(["ruler"])] == list(ruler.RULER_TASKS)
    assert [s.name for s in resolve_tasks(["passkey", "passkey"])] == ["passkey"]
    with pytest.raises(ValueError, match="unknown task.*nope"):
        resolve_tasks(["passkey", "nope"])


def test_items_come_from_the_eval_split_and_do_not_depend_on_the_rest_of_the_grid(tokenizer):
    specs = resolve_tasks(["passkey", "niah_multivalue", "common_words"])
    items = build_items(tokenizer, specs, [300, 600], [0.2, 0.8], 2, seed=3)
    assert len(items) == 3 * 2 * 2 * 2 and len({item.id for item in items}) == len(items)
    assert all(item.example.seed >= EVAL_SEED_OFFSET for item in items)
    alone = build_items(tokenizer, resolve_tasks(["niah_multivalue"]), [600], [0.8], 2, seed=3)
    assert alone == [i for i in items if i.task == "niah_multivalue" and i.length == 600
                     and i.depth == 0.8]  # fmt: skip
    assert item_seed(3, "passkey", 300, 0.2, 0) != item_seed(4, "passkey", 300, 0.2, 0)
    multi = next(item for item in items if item.task == "niah_multivalue")
    assert multi.multi_value and len(multi.expected) == 4
    assert not next(item for item in items if item.task == "common_words").uses_depth


@pytest.mark.parametrize("task", sorted(ruler.RULER_TASKS))
@pytest.mark.parametrize("tokens", [1200, 3000])
def test_ruler_examples(task, tokens, tokenizer):
    example = ruler.RULER_TASKS[task](tokenizer, tokens, 0.3, 12345)
    assert example.task == task
    length = len(tokenizer.encode(example.prompt, add_special_tokens=False))
    assert 0.8 * tokens <= length <= 1.15 * tokens
    values = example.answer.split()
    assert all(value in example.prompt for value in values)
    assert ruler.RULER_TASKS[task](tokenizer, tokens, 0.3, 12345) == example  # deterministic


def test_niah_multivalue_puts_the_first_value_at_depth(tokenizer):
    early = ruler.niah_multivalue(tokenizer, 1500, 0.05, 9)
    first = early.answer.split()[0]
    assert early.prompt.index(first) < 0.2 * len(early.prompt)


def test_niah_multiquery_asks_every_key(tokenizer):
    example = ruler.niah_multiquery(tokenizer, 800, 0.5, 4)
    question = example.prompt.rsplit("\n", 1)[1]
    for value in example.answer.split():
        key = example.prompt.split(f" is: {value}.")[0].rsplit(" ", 1)[1]
        assert key in question


def test_common_words_are_the_most_frequent(tokenizer):
    for tokens in (500, 3000):
        example = ruler.common_words(tokenizer, tokens, 0.5, 21)
        body = example.prompt.split("\n")[1]  # "1. word 2. word ..."
        counts = Counter(token for token in body.split() if not token[0].isdigit())
        common = example.answer.split()
        assert len(common) == 10
        least_common = min(counts[word] for word in common)
        assert all(counts[word] < least_common / 1.9 for word in counts if word not in common)


# ---- report -------------------------------------------------------------------------------------
def fake_run(tokenizer) -> EvalRun:
    specs = resolve_tasks(["passkey", "niah_multivalue"])
    items = build_items(tokenizer, specs, [300, 600], [0.5], 2)
    targets = [TargetInfo("dense", "http", "m", None), TargetInfo("r.25", "http", "m", {
        "sink": 32, "lag": 128, "ratio": 0.25, "score_v_ratio": 1.0})]  # fmt: skip
    results = []
    for item in items:  # dense: always right; r.25: half the values, and 600-token passkey fails
        results.append(grade("dense", item, Answer(" ".join(item.expected), None, 0.1)))
        if item.task == "passkey" and item.length == 600:
            error = f"HTTP 400: maximum context length is 512 tokens, you asked {item.length + 7}"
            results.append(grade("r.25", item, Answer(None, error, 0.1)))
        else:
            half = item.expected[: max(1, len(item.expected) // 2)]
            results.append(grade("r.25", item, Answer(" ".join(half), None, 0.1)))
    return EvalRun({"tasks": ["passkey", "niah_multivalue"]}, targets, items, results)


def test_cells_and_table(tokenizer):
    run = fake_run(tokenizer)
    by_key = lookup(cells(run))
    assert by_key[("dense", "mean", None)].score == 1.0
    assert by_key[("r.25", "passkey", 300)].score == 1.0
    failed = by_key[("r.25", "passkey", 600)]
    assert (failed.score, failed.failed, failed.n) == (0.0, 2, 2)
    assert by_key[("r.25", "niah_multivalue", None)].score == 0.5
    assert by_key[("r.25", "niah_multivalue", None)].exact == 0.0
    header, rows = table_rows(run)
    assert header == ["task", "length", "dense", "r.25"]
    assert ["passkey", "600", "100%", "0% (2/2 failed)"] in rows
    assert rows[-1] == ["mean", "all", "100%", "50% (2/8 failed)"]
    assert "0% (2/2 failed)" in text_table(header, rows)


def test_failures_are_counted_per_task_and_grouped_by_message(tokenizer):
    summary = failures(fake_run(tokenizer))
    assert list(summary) == ["r.25"]
    assert summary["r.25"]["failed"] == 2 and summary["r.25"]["by_task"] == {"passkey": 2}
    (entry,) = summary["r.25"]["messages"]  # two messages differing only in numbers: one line
    assert entry["count"] == 2 and entry["message"].startswith("HTTP 400: maximum context")
