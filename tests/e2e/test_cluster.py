"""The core TrainingJob scenarios of tests/kube/scenarios.py against the real API server.

The same scenarios run against the emulator in tests/kube. Here the operator is the e2e package's
(installed by Helm, running as the chart's ServiceAccount, see conftest.py); each scenario's
``env.operator()`` runs it and stops it when the block ends, as a scenario expects. Workers carry
a node selector no node matches, so they stay Pending and the test plays the kubelet by patching
pod status; test_e2e_trainingjob.py covers the real scheduler and kwok's kubelets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from tests.kube import scenarios as sc

pytestmark = pytest.mark.e2e


@pytest.fixture
def unscheduled(env: sc.Env) -> sc.Env:
    """The scenario environment with workers no node accepts."""
    env.pod_overrides = {"nodeSelector": {"capstan.dev/e2e-unschedulable": "true"}}
    return env


@pytest.mark.parametrize("scenario", sc.CORE_SCENARIOS, ids=lambda f: f.__name__.removeprefix("scenario_"))
async def test_core_scenario_on_cluster(
    unscheduled: sc.Env, scenario: Callable[[sc.Env], Awaitable[None]]
) -> None:
    await scenario(unscheduled)


async def test_snapshots_and_retention_on_cluster(unscheduled: sc.Env) -> None:
    """VolumeSnapshots (snapshot.storage.k8s.io/v1, the external-snapshotter CRDs of `make cluster`)
    at a gang restart and at completion, retention once nothing pins the older one. No CSI driver
    runs: the scenario marks each snapshot readyToUse as the snapshot controller would."""
    await sc.scenario_snapshots_with_retention(unscheduled)
