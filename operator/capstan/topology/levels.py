"""Topology levels: which node labels describe the network hierarchy, narrowest first.

A level is a (name, node label key) pair. The narrowest level is the NVLink domain: nodes whose
GPUs share one NVLink fabric (``nvidia.com/gpu.clique`` on GB200/GB300 NVL72, set by GPU Feature
Discovery). A node without the clique label is its own NVLink domain (an 8-GPU HGX node behind one
NVSwitch). Wider levels (rack, block, zone) group domains over slower links.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from capstan.labels import BLOCK_LABEL, GPU_CLIQUE_LABEL, RACK_LABEL, ZONE_LABEL

LEVELS_ENV = "CAPSTAN_TOPOLOGY_LEVELS"
#: Pseudo level above the widest configured one: "anywhere in the cluster".
CLUSTER_LEVEL = "cluster"

_DISPLAY = {"nvlink": "NVLink domain", "rack": "rack", "block": "block", "zone": "zone",
            CLUSTER_LEVEL: "cluster"}


@dataclass(frozen=True)
class TopologyLevel:
    """One level of the hierarchy: its short name and the node label that carries its value."""

    name: str
    label: str


@dataclass(frozen=True)
class TopologyLevels:
    """Ordered levels, narrowest (index 0, the NVLink domain) to widest."""

    levels: tuple[TopologyLevel, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("at least one topology level is required")
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate topology level names: {names}")
        if CLUSTER_LEVEL in names:
            raise ValueError(f"'{CLUSTER_LEVEL}' is reserved for the whole cluster")

    def __iter__(self) -> Iterator[TopologyLevel]:
        return iter(self.levels)

    def __len__(self) -> int:
        return len(self.levels)

    @property
    def names(self) -> list[str]:
        """Level names, narrowest first."""
        return [lv.name for lv in self.levels]

    def index(self, name: str) -> int:
        """Position of level ``name`` (0 = narrowest); ``cluster`` is one past the widest."""
        if name == CLUSTER_LEVEL:
            return len(self.levels)
        for i, lv in enumerate(self.levels):
            if lv.name == name:
                return i
        raise ValueError(f"unknown topology level {name!r}; known: {[*self.names, CLUSTER_LEVEL]}")


DEFAULT_LEVELS = TopologyLevels(
    (
        TopologyLevel("nvlink", GPU_CLIQUE_LABEL),
        TopologyLevel("rack", RACK_LABEL),
        TopologyLevel("block", BLOCK_LABEL),
        TopologyLevel("zone", ZONE_LABEL),
    )
)


def display_level(name: str) -> str:
    """Human wording of a level for reasons and events ("NVLink domain", "rack", ...)."""
    return _DISPLAY.get(name, name)


def parse_levels(spec: str) -> TopologyLevels:
    """Parse ``"nvlink=nvidia.com/gpu.clique,rack=capstan.dev/rack,..."`` (narrowest first).

    Whitespace around items is ignored; an empty string gives :data:`DEFAULT_LEVELS`.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        return DEFAULT_LEVELS
    levels = []
    for item in items:
        name, sep, label = item.partition("=")
        name, label = name.strip(), label.strip()
        if not sep or not name or not label:
            raise ValueError(f"bad topology level {item!r}: expected name=label.key")
        levels.append(TopologyLevel(name, label))
    return TopologyLevels(tuple(levels))


def levels_from_env(env: Mapping[str, str]) -> TopologyLevels:
    """Levels from ``env[CAPSTAN_TOPOLOGY_LEVELS]``, else the defaults (the operator reads its
    environment once, in :meth:`capstan.config.OperatorConfig.from_env`)."""
    return parse_levels(env.get(LEVELS_ENV, ""))
