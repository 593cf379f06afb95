"""Merge a user's pod template (``spec.template``) over a pod Capstan generated.

Shared by the TrainingJob worker pods and the ModelServing server pods: the template's container
named like the generated one is merged into it, every other container is a sidecar, and lists
(volumes, init containers, tolerations, image pull secrets) are added to Capstan's. Capstan's own
fields win; the template cannot set them in the first place
(:func:`capstan.api.podtemplate.template_problems` rejects that at admission, naming the field).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from capstan.fields import dig
from capstan.security import container_security_context


def by_name(items: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` with ``extra`` merged in by name: an entry of the same name is replaced in place."""
    out = {i["name"]: i for i in items}
    for item in extra:
        out[item["name"]] = item
    return list(out.values())


def hardened(container: Mapping[str, Any]) -> dict[str, Any]:
    """``container`` with Capstan's secure defaults under its own securityContext settings."""
    # The template cannot set the owned keys (capstan.api.podtemplate), so this never relaxes them.
    return {**container, "securityContext": {**container_security_context(),
                                             **(container.get("securityContext") or {})}}


def _merge_container(ours: dict[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**theirs, **ours}
    merged["env"] = by_name(ours.get("env") or [], theirs.get("env") or [])
    if not merged["env"]:
        del merged["env"]
    if theirs.get("envFrom"):
        merged["envFrom"] = theirs["envFrom"]
    for key in ("volumeMounts", "ports"):
        joined = (ours.get(key) or []) + (theirs.get(key) or [])
        if joined:
            merged[key] = joined
    merged["securityContext"] = {**(theirs.get("securityContext") or {}),
                                 **(ours.get("securityContext") or {})}
    resources = {**(theirs.get("resources") or {}), **(ours.get("resources") or {})}
    for part in ("requests", "limits"):
        amounts = {**(dig(theirs, "resources", part) or {}),
                   **(dig(ours, "resources", part) or {})}
        if amounts:
            resources[part] = amounts
    if resources:
        merged["resources"] = resources
    return merged


def merge_template(
    pod: dict[str, Any],
    template_metadata: Mapping[str, Any],
    template_spec: Mapping[str, Any],
    container: str,
) -> dict[str, Any]:
    """``pod`` (``metadata`` and ``spec``: a Pod or a Deployment's pod template) with the template
    merged over it; ``container`` names the generated container the template's one of that name is
    merged into. Capstan's own keys win; the template's scalars (priorityClassName, schedulerName,
    dnsPolicy, ...) and its terminationGracePeriodSeconds go in."""
    tpl = copy.deepcopy(dict(template_spec))
    meta, spec = pod["metadata"], pod["spec"]
    meta["labels"] = {**(template_metadata.get("labels") or {}), **(meta.get("labels") or {})}
    annotations = {**(template_metadata.get("annotations") or {}), **(meta.get("annotations") or {})}
    if annotations:
        meta["annotations"] = annotations

    theirs: dict[str, Any] = next(
        (c for c in tpl.get("containers") or [] if c.get("name") == container), {}
    )
    sidecars = [hardened(c) for c in tpl.pop("containers", None) or [] if c.get("name") != container]
    ours, *others = spec["containers"]
    init = [*(spec.get("initContainers") or []),
            *(hardened(c) for c in tpl.pop("initContainers", None) or [])]

    affinity = tpl.pop("affinity", None) or {}
    security = tpl.pop("securityContext", None) or {}
    volumes = tpl.pop("volumes", None) or []
    tolerations = tpl.pop("tolerations", None) or []
    pull_secrets = tpl.pop("imagePullSecrets", None) or []
    out = {**tpl, **spec}
    if "terminationGracePeriodSeconds" in tpl:  # how long the process may take to stop cleanly
        out["terminationGracePeriodSeconds"] = tpl["terminationGracePeriodSeconds"]
    out["containers"] = [_merge_container(ours, theirs), *others, *sidecars]
    if init:
        out["initContainers"] = init
    out["volumes"] = (spec.get("volumes") or []) + volumes
    out["securityContext"] = {**security, **(spec.get("securityContext") or {})}
    if tolerations:
        out["tolerations"] = (spec.get("tolerations") or []) + tolerations
    if pull_secrets:
        out["imagePullSecrets"] = pull_secrets
    if affinity or "affinity" in spec:
        own = dig(spec, "affinity", "nodeAffinity") or {}
        node_affinity = {**(affinity.get("nodeAffinity") or {}), **own}
        out["affinity"] = {**affinity, **({"nodeAffinity": node_affinity} if node_affinity else {})}
    pod["spec"] = out
    return pod
