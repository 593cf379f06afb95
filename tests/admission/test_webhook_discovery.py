"""The webhook asks API discovery, afresh, whether the cluster serves what a spec needs."""

from __future__ import annotations

import asyncio
from typing import Any

from capstan.admission.handlers import _inference, _keda, _lws
from capstan.kube.client import ApiError


class Discovery:
    """An API server's discovery answers: group/version -> resources served."""

    def __init__(self, served: dict[str, list[str]], broken: bool = False) -> None:
        self.served, self.broken = served, broken
        self.asked: list[str] = []

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        self.asked.append(path)
        if self.broken:
            raise ApiError(500, "InternalError", "etcd is down", method, path)
        gv = path.removeprefix("/apis/")
        if gv not in self.served:
            raise ApiError(404, "NotFound", "not found", method, path)
        return {"resources": [{"name": n} for n in self.served[gv]]}


def ms(**spec: Any) -> dict[str, Any]:
    return {"kind": "ModelServing", "spec": {"model": {"uri": "hf://o/m"}, **spec}}


AUTOSCALED = {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}


def test_each_check_asks_discovery_only_when_the_spec_needs_it() -> None:
    api = Discovery(
        {"leaderworkerset.x-k8s.io/v1": ["leaderworkersets"], "keda.sh/v1alpha1": ["scaledobjects"]}
    )
    memo: Any = {"api": api}
    warnings: list[str] = []

    async def go() -> list[bool | None]:
        return [
            await _lws(ms(runtime="vllm", pipelineParallel=2, **AUTOSCALED), memo, warnings),
            await _lws(ms(**AUTOSCALED), memo, warnings),
            await _keda(ms(autoscaling={"minReplicas": 0}), memo, warnings),
            await _inference(ms(routing={"inferencePool": "Required"}), memo, warnings),
        ]

    assert asyncio.run(go()) == [True, None, True, False]
    assert api.asked == [
        "/apis/leaderworkerset.x-k8s.io/v1",
        "/apis/keda.sh/v1alpha1",
        "/apis/inference.networking.k8s.io/v1",
        "/apis/gateway.networking.k8s.io/v1",
    ]
    assert warnings == []


def test_a_failed_discovery_fails_open_with_a_warning() -> None:
    warnings: list[str] = []
    spec = ms(runtime="vllm", gpusPerPod=4, tensorParallel=8, **AUTOSCALED)
    memo: Any = {"api": Discovery({}, broken=True)}
    answer = asyncio.run(_lws(spec, memo, warnings))
    assert answer is None
    assert warnings == ["LeaderWorkerSet check skipped: API discovery failed (ApiError)"]
