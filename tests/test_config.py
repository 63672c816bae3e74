import json

import pytest

from lrsa_serve.config import LagKVConfig, LagKVConfigError


def test_keep_is_int_of_ratio_times_lag():
    assert LagKVConfig(sink=32, lag=256, ratio=0.25).keep == 64
    assert LagKVConfig(sink=16, lag=100, ratio=0.333).keep == 33


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"ratio": 0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"lag": 0}, "lag"),
        ({"sink": -1}, "sink"),
        ({"lag": 8, "ratio": 0.1}, "keeps int(0.1*8) = 0"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_settings_give_one_line(fields, fragment):
    with pytest.raises(LagKVConfigError) as e:
        LagKVConfig.build(**fields)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_block_alignment():
    LagKVConfig(sink=32, lag=256, ratio=0.25).check_block_size(32)
    with pytest.raises(LagKVConfigError, match="keep=48"):
        LagKVConfig(sink=32, lag=256, ratio=0.1875).check_block_size(32)
    with pytest.raises(LagKVConfigError, match="sink=16"):
        LagKVConfig(sink=16, lag=256, ratio=0.25).check_block_size(32)
    LagKVConfig(sink=16, lag=256, ratio=0.25).check_block_size(16)


def test_checkpoint_round_trip_and_overrides(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert LagKVConfig.from_checkpoint(tmp_path) is None
    assert LagKVConfig.resolve(tmp_path) is None
    cfg = LagKVConfig(sink=64, lag=512, ratio=0.5)
    cfg.write_to_checkpoint(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "llama" and data["lagkv"]["lag"] == 512
    assert LagKVConfig.from_checkpoint(tmp_path) == cfg
    merged = LagKVConfig.resolve(tmp_path, ratio=0.25, lag=None)
    assert (merged.sink, merged.lag, merged.ratio) == (64, 512, 0.25)
    assert LagKVConfig.resolve(None, lag=128).lag == 128


def test_the_engine_refuses_the_same_features_from_arguments_and_config():
    """One list (``engine.settings.REFUSED``): engine arguments are checked before any engine
    starts, vLLM's config where the engine builds; each feature is refused both ways."""
    from types import SimpleNamespace

    from lrsa_serve.engine.settings import REFUSED, check_engine_arguments, check_engine_config

    def config(path: str, value) -> SimpleNamespace:
        """A stand-in for vLLM's config holding one setting at ``path`` (dotted)."""
        root = SimpleNamespace(cache_config=SimpleNamespace(block_size=32))
        *parents, name = path.split(".")
        node = root
        for parent in parents:
            if not hasattr(node, parent):
                setattr(node, parent, SimpleNamespace())
            node = getattr(node, parent)
        setattr(node, name, value)
        return root

    check_engine_arguments({"enable_prefix_caching": True, "decode_context_parallel_size": 1})
    check_engine_config(LagKVConfig(), config("speculative_config", None))
    for path, what in REFUSED.items():
        argument = path.rsplit(".", 1)[-1]  # the engine argument is the config's last name
        on = 2 if "size" in argument else True
        with pytest.raises(LagKVConfigError, match=what.split(" (")[0]):
            check_engine_arguments({argument: on})
        with pytest.raises(LagKVConfigError, match=what.split(" (")[0]):
            check_engine_config(LagKVConfig(), config(path, on))
