import pytest

from capstan.topology import DEFAULT_LEVELS, LEVELS_ENV, levels_from_env, parse_levels


def test_default_levels_narrowest_first() -> None:
    assert DEFAULT_LEVELS.names == ["nvlink", "rack", "block", "zone"]
    assert DEFAULT_LEVELS.levels[0].label == "nvidia.com/gpu.clique"
    assert DEFAULT_LEVELS.index("cluster") == 4


def test_parse_levels_and_env() -> None:
    lv = parse_levels(" nvlink=nvidia.com/gpu.clique , rack=example.com/rack ")
    assert lv.names == ["nvlink", "rack"]
    assert lv.levels[1].label == "example.com/rack"
    assert levels_from_env({LEVELS_ENV: "nvlink=a,zone=b"}).names == ["nvlink", "zone"]
    assert levels_from_env({}) == DEFAULT_LEVELS
    assert parse_levels("") == DEFAULT_LEVELS


@pytest.mark.parametrize("bad", ["nvlink", "=x", "a=b,a=c", "cluster=x"])
def test_parse_levels_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_levels(bad)


def test_unknown_level_name() -> None:
    with pytest.raises(ValueError, match="unknown topology level"):
        DEFAULT_LEVELS.index("pod")
