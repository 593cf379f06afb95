"""The shell around Capstan-managed multi-host groups: read their pods and the cluster, create and
delete pods as :func:`capstan.serving.groups.plan_groups` says.

Groups are placed under the TrainingJob placement lock, from the same cluster view the TrainingJob
queue reads (the watch-fed caches once synced, else a list), gangs placed but whose pods are not
created yet counted from their status, so a serving group and a gang never take the same GPUs;
pods created here are pinned to their nodes and count as held by the next pass of either kind
before the scheduler binds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from capstan.api.modelserving import ModelServing
from capstan.fields import dig
from capstan.kube.activities import operator_config, shared_state
from capstan.kube.client import ApiClient
from capstan.kube.resources import ApiResource, register_kind
from capstan.kube.trainingjob import TrainingState, cluster_view, held_by_placed_gangs
from capstan.labels import LABEL_GROUP_OF
from capstan.naming import label_value
from capstan.serving.groups import GROUP_REVISION_KIND, GroupActions, plan_groups, scale_annotation
from capstan.serving.plan import ServingPlan
from capstan.topology.inventory import Inventory

LEADERWORKERSETS = ApiResource("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", "LeaderWorkerSet")
CONTROLLERREVISIONS = ApiResource("apps", "v1", "controllerrevisions", "ControllerRevision")
for _res in (LEADERWORKERSETS, CONTROLLERREVISIONS):
    register_kind(_res)


def group_selector(ms: ModelServing) -> dict[str, str]:
    """Selects every pod of ``ms``'s Capstan-managed groups (leaders and workers)."""
    return {LABEL_GROUP_OF: label_value(ms.metadata.name)}


async def cluster_inventory(
    api: ApiClient, memo: kopf.Memo, namespace: str, logger: kopf.Logger
) -> Inventory | None:
    """The cluster's GPUs and what holds them, TrainingJob gangs placed but not yet created
    included (None: the Nodes cannot be read)."""
    view = await cluster_view(api, memo, namespace, logger)
    if view is None:
        return None
    nodes, pods, jobs = view
    claims: dict[str, int] = {}
    for held in held_by_placed_gangs(memo, jobs, pods).values():
        for node, gpus in held.items():
            claims[node] = claims.get(node, 0) + gpus
    index = shared_state(memo, "training", TrainingState).nodes  # the one the queue passes keep
    inventory = index.build(nodes, pods, operator_config(memo).topology_levels)
    return inventory.add_usage(claims)


def _desired_count(cr: Mapping[str, Any], plan: ServingPlan) -> Mapping[str, Any]:
    """``cr`` with the number of groups this pass decided (applied or rescaled just now)."""
    name = dig(cr, "metadata", "name")
    for obj in plan.objects:
        if obj.get("kind") == GROUP_REVISION_KIND and dig(obj, "metadata", "name") == name:
            return {**cr, "metadata": {**cr["metadata"], "annotations": obj["metadata"]["annotations"]}}
    if name in plan.scale:
        # the annotations the rescale patch writes (:func:`scale_annotation`), as the cache will hold them
        scaled = scale_annotation(plan.scale[name])["metadata"]["annotations"]
        notes = {**(dig(cr, "metadata", "annotations") or {}), **scaled}
        return {**cr, "metadata": {**cr["metadata"], "annotations": notes}}
    return cr


async def run_groups(
    api: ApiClient,
    ms: ModelServing,
    plan: ServingPlan,
    revisions: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    memo: kopf.Memo,
    logger: kopf.Logger,
) -> list[GroupActions]:
    """Bring the pods of each Capstan-managed group revision (``revisions``: observed
    ControllerRevisions, deleted ones left out) to whole, healthy groups; what was done, per
    revision. Placement reads the cluster only when some group is missing."""
    crs = [
        _desired_count(cr, plan)
        for cr in revisions
        if cr.get("kind") == GROUP_REVISION_KIND and not dig(cr, "metadata", "deletionTimestamp")
    ]
    if not crs:
        return []
    done: list[GroupActions] = []
    lock = shared_state(memo, "training", TrainingState).placement_lock
    async with lock:
        inventory: Inventory | None = None
        read = False
        for cr in crs:
            actions = plan_groups(cr, pods, None)
            if actions.waiting and not read:
                inventory, read = await cluster_inventory(api, memo, ms.metadata.namespace, logger), True
            if actions.waiting:
                actions = plan_groups(cr, pods, inventory)
                # the next revision places around these pods: read the cluster again (the caches
                # hold them at once, through the assume step)
                read = read and not actions.create
            await api.delete_pods(ms.metadata.namespace, actions.delete)
            await api.create_many(actions.create)
            for group, why in actions.restarted:
                logger.info("group %d of %s restarted as a unit: %s", group, dig(cr, "metadata", "name"), why)
            if actions.waiting:
                logger.info("groups of %s wait: %s", dig(cr, "metadata", "name"), actions.waiting)
            done.append(actions)
    return done


__all__ = ["CONTROLLERREVISIONS", "LEADERWORKERSETS", "cluster_inventory", "group_selector", "run_groups"]
