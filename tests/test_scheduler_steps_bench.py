"""``benchmarks/scheduler_steps.py``: the GPU workloads' step structure from vLLM's scheduler alone
(no model), both engines, on this CPU."""

from __future__ import annotations

import json

from benchmarks import scheduler_steps


def test_the_step_structure_of_both_engines(default_model, tmp_path, capsys):
    out = tmp_path / "steps.json"
    argv = ["--workloads", "small-decode", "small-membound", "--scale", "0.05",
            "--sequences", "4", "--json", str(out)]  # fmt: skip
    assert scheduler_steps.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    # 4 x 512 + 512 new: one prefill step of all four prompts, then 511 decode steps, in both.
    for engine in ("vanilla", "lagkv"):
        decode = results["small-decode"][engine]
        assert (decode["steps"], decode["prefill_steps"]) == (512, 1), decode
        assert decode["prefill_tokens_per_step"] == 4 * 512
        assert decode["schedule_ms_decode"] > 0 and decode["preemptions"] == 0
    # 4 x 1,056 (scaled: S + 4L): vanilla prefills them in one step; LagKV's chunks end on
    # partition boundaries (S + 2L = 544, then L = 256 at a time), so three steps.
    membound = results["small-membound"]
    assert membound["vanilla"]["prefill_steps"] == 1
    assert membound["lagkv"]["prefill_steps"] == 3
    assert membound["lagkv"]["prefill_tokens_per_step"] == 4 * 1056 / 3
    # (in prefill, prompt tokens, decoding, waiting) per step
    assert membound["vanilla"]["timeline"][:2] == [[4, 4224, 0, 0], [0, 0, 4, 0]]
    assert membound["lagkv"]["timeline"][:4] == [
        [4, 4 * 544, 0, 0], [4, 4 * 256, 0, 0], [4, 4 * 256, 0, 0], [0, 0, 4, 0]
    ]  # fmt: skip
    table = capsys.readouterr().out
    assert "| small-membound | vanilla | 128 | 1 | 4,224 |" in table
    assert "|  | lagkv | 130 | 3 | 1,408 |" in table


def test_prefix_caching_can_be_turned_off_in_both_schedulers(default_model):
    from benchmarks.gpu_serving import WORKLOADS, sized

    for argv, wanted in (([], True), (["--no-prefix-caching"], False)):
        args = scheduler_steps.parse_args(["--workloads", "small-decode", *argv])
        w = sized(WORKLOADS["small-decode"], 0.05, 2)
        for engine in scheduler_steps.ENGINES:
            scheduler = scheduler_steps.make_scheduler(args, w, engine)
            assert scheduler.cache_config.enable_prefix_caching is wanted
