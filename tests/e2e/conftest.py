"""One Capstan install for the whole e2e package, against the cluster of ``make cluster``.

* ``cluster`` — :class:`Cluster`: the kubeconfig (``$KUBECONFIG``, else ``.capstan/cluster/kubeconfig``),
  an admin ``kubernetes`` client, ``kubectl``/``helm`` runners. Without a cluster the tests skip,
  unless ``CI`` or ``CAPSTAN_E2E`` (not ``0``) is set: then they fail with the reason (the rule of
  test_controlplane.py).
* ``capstan`` — :class:`Install`: ``helm upgrade --install`` of charts/capstan (CRDs, RBAC, the
  ValidatingWebhookConfiguration) into ``capstan-e2e``, and the operator running in this process,
  cluster-wide, as the chart's ServiceAccount with a token from the TokenRequest API, so a verb the
  chart's RBAC lacks fails a test. Its kopf webhook server listens on 127.0.0.1 with a certificate
  made here; the chart's ``webhook.url``/``webhook.caBundle`` point the API server at it.
* ``namespace`` — a fresh namespace per test; ``api`` — Capstan's async client as the admin (the
  test's own reads and writes); ``env`` — :class:`tests.kube.scenarios.Env` for the shared scenarios.

Package-scoped: the install and the operator go away when the e2e package is done, so later test
folders start their own operators (with no webhook environment) as before.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from tests.api.bodies import make_trainingjob
from tests.kube import scenarios as sc
from tests.support.kube import TEST_AGENT, OperatorThread

from capstan.admission import ADDR_ENV, CERT_DIR_ENV, PORT_ENV
from capstan.config import DISCOVERY_TTL_ENV, ENDPOINT_PICKERS_ENV
from capstan.kube.client import ApiClient

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "bin"
CHART = ROOT / "charts" / "capstan"
RELEASE = "e2e"
RELEASE_NAMESPACE = "capstan-e2e"
#: The chart's ServiceAccount for release ``e2e`` (fullname ``e2e-capstan``).
SERVICE_ACCOUNT = "e2e-capstan"
#: The operator's trust in a discovery answer here: tests that install a CRD (KEDA, InferencePool)
#: wait this long for it to be seen, not the default minute.
DISCOVERY_TTL_S = 2
T = TypeVar("T")


def kubeconfig_path() -> str:
    """``$KUBECONFIG``, else the kubeconfig of ``make cluster``."""
    return os.environ.get("KUBECONFIG") or str(ROOT / ".capstan" / "cluster" / "kubeconfig")


def required() -> bool:
    """A missing cluster is a failure in CI and when CAPSTAN_E2E asks for the e2e tests."""
    return bool(os.environ.get("CI")) or os.environ.get("CAPSTAN_E2E", "0") not in ("", "0")


def admin_client() -> Any:
    """A kubernetes ApiClient of :func:`kubeconfig_path` (its admin identity) that has answered;
    skip the test without a cluster, or fail when one is :func:`required`."""
    import kubernetes

    path = kubeconfig_path()
    try:
        client = kubernetes.config.new_client_from_config(config_file=path)
        kubernetes.client.VersionApi(client).get_code(_request_timeout=5)
    except Exception as exc:  # any failure means "no cluster is up"
        reason = f"no cluster answers with kubeconfig {path} ({type(exc).__name__}: {exc})"[:400]
        reason += "; start one with `make cluster`"
        if required():
            pytest.fail(f"{reason} (required: CI or CAPSTAN_E2E is set)", pytrace=False)
        pytest.skip(reason)
    return client


def wait_until(get: Callable[[], T], until: Callable[[T], bool] = bool, timeout: float = 60,
               what: str = "condition", interval: float = 0.25) -> T:
    """Call ``get`` until ``until(result)`` holds (exceptions count as not yet); fail after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = get()
            if until(last):
                return last
        except Exception as exc:  # not found yet, a conflict: retry until the deadline
            last = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {str(last)[:800]}")


@dataclass
class Cluster:
    """The cluster under test, as its admin."""

    kubeconfig: str
    client: Any  # kubernetes.client.ApiClient
    server: str
    ca_path: str
    cert_path: str
    key_path: str

    def run(self, tool: str, *args: str, stdin: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run .tools/bin/<tool> with this kubeconfig; fail the test with its output when it fails."""
        cmd = [str(TOOLS / tool), "--kubeconfig", self.kubeconfig, *args]
        res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            pytest.fail(f"{tool} {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}",
                        pytrace=False)
        return res

    def kubectl(self, *args: str, stdin: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """``kubectl ARGS`` as the admin."""
        return self.run("kubectl", *args, stdin=stdin, check=check)

    def connection(self) -> Any:
        """kopf.ConnectionInfo of the admin (client certificate)."""
        import kopf

        return kopf.ConnectionInfo(server=self.server, ca_path=self.ca_path,
                                   certificate_path=self.cert_path, private_key_path=self.key_path)


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    """The cluster, or a skip (a failure when required) when none answers."""
    import kubernetes

    path = kubeconfig_path()
    try:
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
        client = kubernetes.client.ApiClient(config)
        kubernetes.client.VersionApi(client).get_code(_request_timeout=5)
    except Exception as exc:  # any failure means "no cluster is up"
        reason = f"no cluster answers with kubeconfig {path} ({type(exc).__name__}: {exc})"[:400]
        reason += "; start one with `make cluster`"
        if required():
            pytest.fail(f"{reason} (required: CI or CAPSTAN_E2E is set)", pytrace=False)
        pytest.skip(reason)
    for tool in ("kubectl", "helm"):
        if not os.access(TOOLS / tool, os.X_OK):
            pytest.fail(f"{TOOLS / tool} is missing: run `make tools`", pytrace=False)
    return Cluster(path, client, config.host, config.ssl_ca_cert, config.cert_file, config.key_file)


# --- the webhook server's certificate -------------------------------------------------------------


def webhook_certificate(directory: Path) -> str:
    """A CA and a serving certificate for 127.0.0.1 in ``directory`` (tls.crt, tls.key, as the
    chart's Secret); returns the CA as base64 PEM, the ValidatingWebhookConfiguration's caBundle."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    pem = serialization.Encoding.PEM

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("capstan-e2e-webhook-ca"))
          .issuer_name(name("capstan-e2e-webhook-ca")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "tls.crt").write_bytes(cert.public_bytes(pem))
    (directory / "tls.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return base64.b64encode(ca.public_bytes(pem)).decode()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the install and the operator ----------------------------------------------------------------


class ForbiddenLog(logging.Handler):
    """Collects the operator's warnings and errors about refused API calls (HTTP 403): RBAC the
    chart lacks. The operator logs them and retries rather than failing, so the tests look here."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    #: How the API server words an RBAC denial (not e.g. writes into a namespace being deleted).
    DENIED = re.compile(r'forbidden: User "[^"]+" cannot \S+ resource')

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if self.DENIED.search(text):
            self.records.append(f"{record.name}: {text}"[:600])


@dataclass
class Install:
    """Capstan installed by Helm, and its operator running in this process."""

    cluster: Cluster
    release: str
    namespace: str
    service_account: str
    webhook_port: int
    operator: OperatorThread
    values: dict[str, Any] = field(default_factory=dict)
    forbidden: ForbiddenLog = field(default_factory=ForbiddenLog)

    def ensure_running(self) -> None:
        """Start the operator again if a test stopped it."""
        if not self.operator.running:
            self.operator.start()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The operator runs inside the context and is stopped when it closes (the next test, or
        the next ``running()``, starts it again): what ``Env.operator`` of a scenario promises."""
        import asyncio

        if not self.operator.running:
            await asyncio.to_thread(self.operator.start)
        try:
            yield
        finally:
            await asyncio.to_thread(self.operator.stop)


def service_account_token(cluster: Cluster, namespace: str, name: str) -> str:
    """A token of ServiceAccount ``namespace/name`` from the TokenRequest API (one hour)."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.client)
    request = {"spec": {"expirationSeconds": 3600}}
    token = wait_until(lambda: core.create_namespaced_service_account_token(name, namespace, request),
                       what=f"a token of ServiceAccount {namespace}/{name}")
    return str(token.status.token)


@pytest.fixture(scope="package")
def capstan(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    """Helm install of the chart, then the operator as the chart's ServiceAccount (see module doc)."""
    import kopf

    certs = tmp_path_factory.mktemp("webhook-tls")
    ca_bundle = webhook_certificate(certs)
    port = free_port()
    values = {
        "webhook": {"url": f"https://127.0.0.1:{port}", "caBundle": ca_bundle, "timeoutSeconds": 5},
        # Its own peering name: the kustomize base (test_install.py) brings a ClusterKopfPeering "capstan".
        "operator": {"peering": "capstan-e2e"},
        # InferencePools and their endpoint pickers (the operator gets roles and rolebindings).
        "routing": {"endpointPickers": True},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as vf:
        yaml.safe_dump(values, vf)
    try:
        # --force-conflicts: Helm 4 applies the chart's CRDs server-side; a cluster kept across runs
        # holds them from the kustomize test too (kubectl's field manager). Take them over.
        cluster.run("helm", "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
                    "--create-namespace", "--values", vf.name, "--wait=false", "--force-conflicts",
                    timeout=180)
    finally:
        os.unlink(vf.name)
    cluster.kubectl("wait", "--for=condition=Established", "crd/trainingjobs.capstan.dev",
                    "crd/modelservings.capstan.dev", "--timeout=60s")

    token = service_account_token(cluster, RELEASE_NAMESPACE, SERVICE_ACCOUNT)
    conn = kopf.ConnectionInfo(server=cluster.server, ca_path=cluster.ca_path, token=token)
    saved = {k: os.environ.get(k) for k in (CERT_DIR_ENV, PORT_ENV, ADDR_ENV, ENDPOINT_PICKERS_ENV,
                                            DISCOVERY_TTL_ENV)}
    # The environment the chart gives the operator's Deployment, for the values above.
    os.environ.update({CERT_DIR_ENV: str(certs), PORT_ENV: str(port), ADDR_ENV: "127.0.0.1",
                       ENDPOINT_PICKERS_ENV: "on", DISCOVERY_TTL_ENV: str(DISCOVERY_TTL_S)})
    # With the chart's peering (as its Deployment runs it): kopf's peering calls go through RBAC too.
    operator = OperatorThread(connection=conn, timeout_s=30, peering=values["operator"]["peering"])
    install = Install(cluster, RELEASE, RELEASE_NAMESPACE, SERVICE_ACCOUNT, port, operator, values)
    logging.getLogger().addHandler(install.forbidden)
    try:
        operator.start()
        wait_webhook_ready(cluster)
        yield install
    finally:
        try:
            release_namespaces(cluster, install)
            if operator.running:
                operator.stop()
        finally:
            logging.getLogger().removeHandler(install.forbidden)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            # Releases the cluster-scoped objects (a persistent `make cluster` can run the suite
            # again); the CRDs stay, as Helm leaves crds/ alone.
            cluster.run("helm", "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait=false",
                        check=False)


def release_namespaces(cluster: Cluster, install: Install, timeout: float = 30) -> None:
    """Let the operator finish the deletion of the tests' namespaces (their objects carry its
    finalizer); whatever still holds one after ``timeout`` is released by hand."""
    from kubernetes import client

    install.ensure_running()
    core = client.CoreV1Api(cluster.client)
    custom = client.CustomObjectsApi(cluster.client)

    def ours() -> list[str]:
        return [n.metadata.name for n in core.list_namespace().items if n.metadata.name.startswith("e2e-")]

    deadline = time.monotonic() + timeout
    while ours() and time.monotonic() < deadline:
        time.sleep(0.5)
    for ns in ours():
        for plural in ("trainingjobs", "modelservings"):
            for obj in custom.list_namespaced_custom_object("capstan.dev", "v1alpha1", ns, plural)["items"]:
                with contextlib.suppress(Exception):
                    custom.patch_namespaced_custom_object("capstan.dev", "v1alpha1", ns, plural,
                                                          obj["metadata"]["name"],
                                                          {"metadata": {"finalizers": None}})


def wait_webhook_ready(cluster: Cluster) -> None:
    """Wait until the API server reaches the webhook: a server-side dry run of an invalid
    TrainingJob (16 GPUs a worker: no node has as many) is denied by it."""
    body = json.dumps(make_trainingjob("probe").namespace("default").image("x").workers(1).gpus(16).obj())

    def probe() -> str:
        return cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=body, check=False).stderr

    wait_until(probe, lambda err: "denied the request" in err, timeout=60, what="the validating webhook")


@pytest.fixture(autouse=True)
def no_forbidden_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which the operator was refused an API call (a verb missing from the
    chart's RBAC: it runs as the chart's ServiceAccount)."""
    if "capstan" not in request.fixturenames:
        yield
        return
    install: Install = request.getfixturevalue("capstan")
    before = len(install.forbidden.records)
    yield
    refused = install.forbidden.records[before:]
    assert not refused, "the operator was refused API calls (chart RBAC):\n" + "\n".join(refused)


@pytest.fixture
def namespace(cluster: Cluster, capstan: Install) -> Iterator[str]:
    """A fresh namespace for one test (the operator running), deleted afterwards."""
    from kubernetes import client

    capstan.ensure_running()
    core = client.CoreV1Api(cluster.client)
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: core.read_namespaced_service_account("default", name), what="default ServiceAccount")
    yield name
    capstan.ensure_running()  # it handles the finalizers of what the namespace still holds
    core.delete_namespace(name)


@pytest.fixture
async def api(cluster: Cluster) -> AsyncIterator[ApiClient]:
    """Capstan's async client as the admin (the test's own reads and writes)."""
    client = ApiClient.from_connection(cluster.connection())
    client.headers["User-Agent"] = TEST_AGENT
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def env(api: ApiClient, namespace: str, capstan: Install) -> sc.Env:
    """The shared scenarios' environment: the namespace, the admin client, the package's operator."""
    return sc.Env(api=api, namespace=namespace, operator=capstan.running)
