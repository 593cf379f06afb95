"""Generated TrainingJob and ModelServing specs sent through the real API server (issue: fuzzing).

Each spec is a sample of manifests/samples with one to three values of its ``spec`` replaced by
arbitrary JSON, or unknown keys added (``tests/api/test_bad_input.py::mutated_resource``). First
every one goes to the API server as a server-side dry run, through the CRD schema, its CEL rules
and Capstan's webhook: it is admitted, or refused (400/422) with a message that names the field
it is about. Then a sample of the admitted ones is created for real, in a namespace the operator
watches: each gets a status from the operator (``observedGeneration``), none makes its reconcile
fail (no ``ReconcileError`` condition, no such Event), and the operator keeps serving a plain job
created after them. Seeded (``derandomize``): CI sees the same specs every run.
"""

from __future__ import annotations

import copy
import json
import re
import time
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from tests.api.test_bad_input import mutated_resource
from tests.e2e.conftest import Cluster, Install, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

GROUP, VERSION = "capstan.dev", "v1alpha1"
PLURALS = {"TrainingJob": "trainingjobs", "ModelServing": "modelservings"}
EXAMPLES = 150
CREATED = 12  # admitted specs created for real
#: How the API server and the webhook point at a field: ``spec.x``, ``spec.x[0].y``, ``.spec.x``,
#: ``unknown field "spec.x"``; each message must name one under ``spec``.
FIELD = re.compile(r"\bspec(\.[\w$-]+|\[\d+\])*")
ADMITTED: list[dict[str, Any]] = []
REFUSED: list[str] = []


def _spec_mutation(resource: Any) -> bool:
    """A Capstan resource whose ``metadata`` is intact (the fuzz is about specs) and that JSON can
    carry (no infinities or NaN: no client could send them)."""
    if not isinstance(resource, dict) or resource.get("apiVersion") != f"{GROUP}/{VERSION}":
        return False
    kind = resource.get("kind")
    if not (isinstance(kind, str) and kind in PLURALS and isinstance(resource.get("spec"), dict)
            and isinstance(resource.get("metadata"), dict)):
        return False
    try:
        json.dumps(resource, allow_nan=False)
    except ValueError:
        return False
    return True


SPECS = mutated_resource().filter(_spec_mutation)


def _named(resource: dict[str, Any], namespace: str) -> dict[str, Any]:
    obj = copy.deepcopy(resource)
    obj["metadata"] = {"name": f"fz-{uuid.uuid4().hex[:10]}", "namespace": namespace}
    return obj


def _dry_run(cluster: Cluster, obj: dict[str, Any]) -> tuple[int, str]:
    """Create ``obj`` as a server-side dry run: (0, "") when admitted, else (status, message)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(cluster.client)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, obj["metadata"]["namespace"],
                                               PLURALS[obj["kind"]], obj, dry_run="All")
    except ApiException as exc:
        try:
            message = str(json.loads(exc.body)["message"])
        except (TypeError, ValueError, KeyError):
            message = str(exc.body)
        return exc.status, message
    return 0, ""


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(resource=SPECS)
def test_generated_specs_are_admitted_or_refused_naming_the_field(
    cluster: Cluster, capstan: Install, resource: dict[str, Any]
) -> None:
    obj = _named(resource, "default")
    status, message = _dry_run(cluster, obj)
    if status == 0:
        ADMITTED.append(resource)
        return
    REFUSED.append(message)
    assert status in (400, 422), f"{status}: {message}\n{json.dumps(obj['spec'])[:2000]}"
    assert FIELD.search(message), f"no field named in: {message}\n{json.dumps(obj['spec'])[:2000]}"
    assert "Traceback" not in message and len(message) < 20_000, message[:3000]


def test_admitted_generated_specs_never_wedge_the_operator(
    cluster: Cluster, capstan: Install, namespace: str
) -> None:
    from kubernetes import client

    assert REFUSED, "the fuzz run refused nothing: the generator lost its teeth"
    assert ADMITTED, "the fuzz run admitted nothing: the generator breaks every spec"
    custom = client.CustomObjectsApi(cluster.client)
    core = client.CoreV1Api(cluster.client)
    # distinct specs, spread over the run
    chosen = [ADMITTED[i] for i in sorted({round(i * (len(ADMITTED) - 1) / max(CREATED - 1, 1))
                                           for i in range(min(CREATED, len(ADMITTED)))})]
    made = []
    for resource in chosen:
        obj = _named(resource, namespace)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[obj["kind"]], obj)
        made.append((obj["kind"], obj["metadata"]["name"]))
    capstan.ensure_running()

    def statuses() -> list[dict[str, Any]]:
        return [custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
                for kind, name in made]

    def all_seen(objs: list[dict[str, Any]]) -> bool:
        return all((o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
                   for o in objs)

    objs = wait_until(statuses, all_seen, timeout=120, what="a status for every admitted generated spec")
    for obj in objs:
        reasons = {c.get("reason") for c in (obj.get("status") or {}).get("conditions") or []}
        assert "ReconcileError" not in reasons, (obj["kind"], obj["spec"], obj["status"])
    events = core.list_namespaced_event(namespace).items
    failed = [(e.involved_object.name, e.message) for e in events if e.reason == "ReconcileError"]
    assert not failed, failed

    # the operator still works: a plain job created after them gets its status at once
    plain = _named({"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "metadata": {},
                    "spec": {"image": "registry.example/trainer:1", "workers": 1,
                             "nodeSelector": {"capstan.dev/e2e-unschedulable": "true"}}}, namespace)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs", plain)
    began = time.monotonic()
    def plain_job() -> dict[str, Any]:
        return dict(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainingjobs",
                                                        plain["metadata"]["name"]))

    wait_until(plain_job, lambda o: bool((o.get("status") or {}).get("phase")), timeout=60,
               what="a status for a plain job created after the generated ones")
    assert time.monotonic() - began < 60
    print(f"fuzz: {len(ADMITTED)} admitted, {len(REFUSED)} refused naming the field; "
          f"{len(made)} admitted specs created, all reconciled")


def test_field_pattern_finds_the_ways_the_server_names_fields() -> None:
    """The pattern the fuzz checks messages with, on messages the API server and webhook write."""
    for message in (
        'TrainingJob.capstan.dev "x" is invalid: spec.workers: Invalid value: 0',
        'admission webhook "validate-trainingjobs.capstan.dev" denied the request: '
        "TrainingJob default/x is invalid: spec.topology.policy: Input should be 'Required'",
        'strict decoding error: unknown field "spec.workerz"',
        "spec.template.spec.containers[0].env[1].name: Invalid value",
    ):
        assert FIELD.search(message), message
    assert not FIELD.search("Internal error occurred: failed calling webhook")

