"""The Kubernetes API calls the operator made in a scenario, as RBAC (verb, group, resource, sub).

The packaging engineer compares these with the Helm ClusterRole::

    from tests.kube.rbac_calls import rbac_calls, as_rules
    calls = rbac_calls(cluster.emulator)          # after running a scenario
    rules = as_rules(calls)                       # [{"apiGroups": [...], "resources": [...], "verbs": [...]}]

``python -m tests.kube.rbac_calls`` runs every core scenario against the emulator and prints the
union as JSON (calls and rules).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from tests.support.kube import TEST_AGENT, Emulator, api_calls

Call = tuple[str, str, str, str]


def rbac_calls(emulator: Emulator, exclude_agents: Iterable[str] = (TEST_AGENT,)) -> set[Call]:
    """(verb, apiGroup, resource, subresource) of every request the operator (and kopf) made.

    The test client's own requests (user agent ``capstan-tests``) and discovery are left out.
    """
    return api_calls(emulator, exclude_agents)


def as_rules(calls: Iterable[Call]) -> list[dict[str, list[str]]]:
    """Group calls into ClusterRole rules: one rule per (apiGroup, resource[/subresource])."""
    verbs: dict[tuple[str, str], set[str]] = {}
    for verb, group, resource, sub in calls:
        verbs.setdefault((group, f"{resource}/{sub}" if sub else resource), set()).add(verb)
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(v)}
        for (group, resource), v in sorted(verbs.items())
    ]


async def _all_scenarios() -> set[Call]:
    from tests.kube.scenarios import CORE_SCENARIOS, Env
    from tests.support.kube import emulated_cluster, test_client

    calls: set[Call] = set()
    for scenario in CORE_SCENARIOS:
        async with emulated_cluster() as (emulator, url):
            from tests.support.kube import running_operator

            api = test_client(url)
            try:
                await scenario(Env(api=api, namespace="default", operator=lambda: running_operator(url)))
            finally:
                await api.close()
            calls |= rbac_calls(emulator)
    return calls


def main() -> None:
    """Print the calls and rules of all core scenarios as JSON."""
    calls = asyncio.run(_all_scenarios())
    print(json.dumps({"calls": sorted(calls), "rules": as_rules(calls)}, indent=2))


if __name__ == "__main__":
    main()
