#!/usr/bin/env python3
"""A local Kubernetes control plane for tests and development, on 127.0.0.1 only.

Runs etcd, kube-apiserver (RBAC, TokenRequest, admission webhooks), kube-controller-manager,
kube-scheduler and kwok (fakes the kubelets of the fake GPU nodes of manifests/dev/topology.yaml),
built from source by scripts/build-controlplane.sh into .tools/bin. Everything it writes lies under
``.capstan/cluster/`` (CAPSTAN_CLUSTER_DIR): certificates, kubeconfigs, pid files, logs, etcd data.

    cluster.py up             stop a previous cluster, start a fresh one, print how to use it
    cluster.py down           stop every process a previous `up` started
    cluster.py status         which components run
    cluster.py restart [--kill] COMPONENT...
                              stop (or SIGKILL) components of the running cluster and start them
                              again with the same command line, data kept (fault experiments)
    cluster.py run -- CMD...  up, run CMD with KUBECONFIG set, then down (also on failure)

Ports are free ones picked at start (several worktrees can each run a cluster); set
CAPSTAN_CLUSTER_API_PORT to pin the API server's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("CAPSTAN_CLUSTER_DIR", ROOT / ".capstan" / "cluster")).resolve()
TOOLS = Path(os.environ.get("CAPSTAN_TOOLS_BIN", ROOT / ".tools" / "bin"))
HACK = ROOT / "hack" / "controlplane"
TOPOLOGY = Path(os.environ.get("CAPSTAN_TOPOLOGY", ROOT / "manifests" / "dev" / "topology.yaml"))
HOST = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# Start order; `down` stops in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# kwok's own stage files (sigs.k8s.io/kwok kustomize/stage/...): what kwokctl runs by default
# (nodes Ready with leases; pods Running, Job pods Succeeded, deleted pods removed) plus the
# chaos stage that fails a labelled pod with the exit code of its annotation.
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
    "kustomize/stage/pod/chaos/pod-container-running-failed.yaml",
)
# Third-party CRDs: (module folder under hack/controlplane, module path, its kustomization).
# Gateway API's config/crd is the standard channel (and its safe-upgrades admission policy).
CRD_SOURCES = (
    ("crds", "github.com/kubernetes-csi/external-snapshotter/client/v8", "config/crd"),
    ("crds", "sigs.k8s.io/gateway-api", "config/crd"),
)


class ClusterError(Exception):
    """A cluster step failed; the message says which and what to do."""


def log(msg: str) -> None:
    """Progress on stderr, prefixed like the build script's."""
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Paths of the cluster's certificates and keys."""

    dir: Path

    def path(self, name: str) -> Path:
        """``<dir>/<name>``."""
        return self.dir / name


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_pki(pki: Pki) -> None:
    """Fresh CAs (cluster and front proxy), the API server's serving certificate, one client
    certificate per identity and the service-account signing key pair (ECDSA P-256: quick to make,
    accepted everywhere)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki.dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=365)
    pem = serialization.Encoding.PEM

    def name(cn: str, orgs: Sequence[str] = ()) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: x509.Name, issuer: x509.Name, key: Any, ca: bool) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )

    def make_ca(file: str, cn: str) -> tuple[x509.Name, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False,
        )
        unsigned = builder(name(cn), name(cn), key, True).add_extension(usage, critical=True)
        pki.path(f"{file}.crt").write_bytes(unsigned.sign(key, hashes.SHA256()).public_bytes(pem))
        _write_key(pki.path(f"{file}.key"), key)
        return name(cn), key

    def issue(ca: tuple[x509.Name, Any], file: str, cn: str, orgs: Sequence[str] = (),
              server: bool = False) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = builder(name(cn, orgs), ca[0], key, False).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if server:
            service_ip = ipaddress.IPv4Network(SERVICE_CIDR)[1]  # the `kubernetes` Service's IP
            dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                   "kubernetes.default.svc.cluster.local"]
            cert = cert.add_extension(
                x509.SubjectAlternativeName(
                    [*(x509.DNSName(d) for d in dns),
                     x509.IPAddress(ipaddress.ip_address(HOST)), x509.IPAddress(service_ip)]
                ),
                critical=False,
            )
        pki.path(f"{file}.crt").write_bytes(cert.sign(ca[1], hashes.SHA256()).public_bytes(pem))
        _write_key(pki.path(f"{file}.key"), key)

    ca = make_ca("ca", "capstan-local-ca")
    issue(ca, "apiserver", "kube-apiserver", server=True)
    issue(ca, "admin", "capstan-admin", ["system:masters"])
    issue(ca, "kube-controller-manager", "system:kube-controller-manager")
    issue(ca, "kube-scheduler", "system:kube-scheduler")
    # kwok's upstream RBAC (kustomize/rbac) binds the ServiceAccount kube-system/kwok-controller;
    # RBAC matches a ServiceAccount subject by user name, so a certificate with that name gets
    # exactly kwok's role and no more.
    issue(ca, "kwok", "system:serviceaccount:kube-system:kwok-controller",
          ["system:serviceaccounts", "system:serviceaccounts:kube-system"])
    # The aggregation layer's client identity towards extension API servers, from its own CA.
    issue(make_ca("front-proxy-ca", "capstan-front-proxy-ca"), "front-proxy-client", "front-proxy-client")
    sa_key = ec.generate_private_key(ec.SECP256R1())
    _write_key(pki.path("sa.key"), sa_key)
    pki.path("sa.pub").write_bytes(
        sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def write_kubeconfig(path: Path, pki: Pki, identity: str, server: str) -> None:
    """A self-contained kubeconfig (certificates embedded) for one client identity."""

    def b64(name: str) -> str:
        return base64.b64encode(pki.path(name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "capstan-local",
                      "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": identity, "user": {"client-certificate-data": b64(f"{identity}.crt"),
                                              "client-key-data": b64(f"{identity}.key")}}],
        "contexts": [{"name": "capstan-local", "context": {"cluster": "capstan-local", "user": identity}}],
        "current-context": "capstan-local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# --- processes ------------------------------------------------------------------------------


def _pid_file(name: str) -> Path:
    return STATE / "pids" / f"{name}.pid"


def _ours(pid: int) -> bool:
    """Whether ``pid`` runs and is one of this cluster's processes (its command line names the
    state folder), so a recycled pid is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return f"{STATE}{os.sep}" in cmdline


def _recorded_pid(name: str) -> int | None:
    try:
        return int(_pid_file(name).read_text().strip())
    except (OSError, ValueError):
        return None


def _stop(name: str, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Stop one component with ``sig`` (SIGKILL after 15 s); True when it was running."""
    pid = _recorded_pid(name)
    started = _start_time(pid) if pid is not None and _ours(pid) else None
    if pid is not None and started is not None:
        # Wait for this very process to end (same pid and start time), not for its command line
        # to vanish: an exiting process loses that before it closes its sockets, and a restart
        # would find the port still taken.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while not _ended(pid, started) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _ended(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while not _ended(pid, started):
                time.sleep(0.05)
    _pid_file(name).unlink(missing_ok=True)
    return started is not None


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat), None when there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _ended(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` has exited (a zombie counts)."""
    return _reaped(pid) or _start_time(pid) != started


def stop_all(quiet: bool = False) -> list[str]:
    """Stop the processes the pid files name (newest component first); returns what was stopped."""
    stopped = [name for name in reversed(COMPONENTS) if _stop(name)]
    if stopped and not quiet:
        log(f"stopped {', '.join(stopped)}")
    return stopped


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it is our exited child (``run`` starts children); True once it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: /proc tells whether it still runs
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state in {"Z", "X"}
    return done == pid


def start(name: str, args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start one component in its own session (it outlives this script), logging to logs/<name>.log."""
    binary = TOOLS / name
    if not os.access(binary, os.X_OK):
        raise ClusterError(f"{binary} is missing: run `make controlplane` (scripts/build-controlplane.sh)")
    logfile = STATE / "logs" / f"{name}.log"
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            [str(binary.resolve()), *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, cwd=STATE, env={**os.environ, **(env or {})},
        )
    _pid_file(name).write_text(f"{proc.pid}\n")
    # What `restart` runs again (a fault experiment restarts etcd or the API server mid-flight).
    _command_file(name).write_text(json.dumps({"args": list(args), "env": env or {}}) + "\n")
    return proc


def _command_file(name: str) -> Path:
    return STATE / "pids" / f"{name}.command.json"


def _health(name: str, info: dict[str, Any]) -> tuple[str, ssl.SSLContext | None]:
    """The URL that answers 200 once component ``name`` of the cluster ``info`` describes is up."""
    port = info["ports"][name]
    if name == "kube-apiserver":
        return f"{info['server']}/readyz", _ssl_client(Pki(STATE / "pki"))
    if name in ("kube-controller-manager", "kube-scheduler"):
        return f"https://{HOST}:{port}/healthz", _ssl_insecure()
    return f"http://{HOST}:{port}/{'health' if name == 'etcd' else 'healthz'}", None


def restart(names: Sequence[str], sig: signal.Signals = signal.SIGTERM) -> dict[str, float]:
    """Stop components ``names`` of the recorded cluster with ``sig`` (newest first; those not
    running are only started), start them again with their recorded command lines (oldest first)
    and wait until each is healthy; returns the seconds each took from its start to healthy. Their
    data (etcd's) stays."""
    unknown = sorted(set(names) - set(COMPONENTS))
    if unknown:
        raise ClusterError(f"no component {', '.join(unknown)}: choose from {', '.join(COMPONENTS)}")
    try:
        info = json.loads((STATE / "cluster.json").read_text())
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no cluster recorded in {STATE}: start one with `make cluster` ({exc})") from exc
    chosen = [name for name in COMPONENTS if name in names]
    try:
        commands = {name: json.loads(_command_file(name).read_text()) for name in chosen}
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no recorded command line in {STATE / 'pids'} ({exc}): start a fresh "
                           "cluster with `make cluster`") from exc
    for name in reversed(chosen):
        _stop(name, sig)
    took = {}
    for name in chosen:
        # A killed multi-threaded process shows as ended (a zombie) before its last thread has
        # released its sockets: wait until its ports can be bound again.
        ports = [info["ports"][key] for key in info["ports"] if key.split("-peer")[0] == name]
        deadline = time.monotonic() + 30
        while not all(_bindable(port) for port in ports):
            if time.monotonic() > deadline:
                raise ClusterError(f"{name}'s ports {ports} still taken 30 s after it stopped")
            time.sleep(0.05)
        began = time.monotonic()
        proc = start(name, commands[name]["args"], commands[name]["env"] or None)
        url, ctx = _health(name, info)
        wait_http(name, proc, url, ctx, 90)
        took[name] = round(time.monotonic() - began, 2)
    return took


def _log_tail(name: str, lines: int = 25) -> str:
    path = STATE / "logs" / f"{name}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bindable(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:port now (with SO_REUSEADDR, as Go's listeners)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def wait_http(name: str, proc: subprocess.Popen[bytes], url: str, ctx: ssl.SSLContext | None,
              timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early with the log's tail when the process exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"{name} exited with status {proc.returncode}; its log ends:\n"
                               f"{_log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
        except (OSError, ssl.SSLError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise ClusterError(f"{name} not ready at {url} after {timeout:.0f}s ({last}); its log ends:\n"
                       f"{_log_tail(name)}")


# --- inputs from Go modules and the topology file -------------------------------------------


def module_dir(module_folder: str, module: str) -> Path:
    """The module-cache folder of ``module`` at the version hack/controlplane/<folder>/go.mod pins."""
    go = shutil.which(os.environ.get("GO", "go"))
    if go is None:
        raise ClusterError("go is not on PATH: it reads the pinned CRDs and kwok stages from the Go "
                           "module cache")
    res = subprocess.run([go, "mod", "download", "-json", module], cwd=HACK / module_folder,
                         capture_output=True, text=True)
    try:
        info = json.loads(res.stdout)
    except json.JSONDecodeError:
        info = {}
    if res.returncode != 0 or "Dir" not in info:
        raise ClusterError(f"go mod download {module} failed: {info.get('Error') or res.stderr.strip()}")
    return Path(info["Dir"])


def fake_nodes(topology: dict[str, Any]) -> list[dict[str, Any]]:
    """Node objects (kwok-managed) for every pool x rack x node of a topology file."""
    nodes = []
    for pool in topology.get("pools") or []:
        for key in ("name", "product", "gpusPerNode", "nodesPerRack", "nvlink", "racks"):
            if key not in pool:
                raise ClusterError(f"{TOPOLOGY}: pool {pool.get('name', '?')!r} lacks {key!r}")
        if pool["nvlink"] not in ("node", "rack"):
            raise ClusterError(f"{TOPOLOGY}: pool {pool['name']!r}: nvlink must be 'node' or 'rack', "
                               f"not {pool['nvlink']!r}")
        for rack in pool["racks"]:
            missing = [key for key in ("name", "block", "zone") if key not in rack]
            if missing:
                raise ClusterError(f"{TOPOLOGY}: a rack of pool {pool['name']!r} lacks {', '.join(missing)}")
            for i in range(1, int(pool["nodesPerRack"]) + 1):
                name = f"{pool['name']}-{rack['name']}-{i}"
                clique = name if pool["nvlink"] == "node" else f"{pool['name']}-{rack['name']}"
                labels = {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": str(pool["product"]),
                    "nvidia.com/gpu.count": str(pool["gpusPerNode"]),
                    "nvidia.com/gpu.clique": clique,
                    "capstan.dev/rack": str(rack["name"]),
                    "capstan.dev/block": str(rack["block"]),
                    "topology.kubernetes.io/zone": str(rack["zone"]),
                }
                resources = {k: str(v) for k, v in (pool.get("allocatable") or {}).items()}
                resources["nvidia.com/gpu"] = str(pool["gpusPerNode"])
                nodes.append({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name, "labels": labels, "annotations": {KWOK_ANNOTATION: "fake"}},
                    "status": {"allocatable": resources, "capacity": resources},
                })
    return nodes


# --- up / down ------------------------------------------------------------------------------


class Kubectl:
    """kubectl from .tools/bin with the admin kubeconfig."""

    def __init__(self, kubeconfig: Path) -> None:
        binary = TOOLS / "kubectl"
        if not os.access(binary, os.X_OK):
            raise ClusterError(f"{binary} is missing: run `make tools`")
        self.base = [str(binary), "--kubeconfig", str(kubeconfig)]

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        """Run kubectl; raise ClusterError with its stderr on failure."""
        res = subprocess.run([*self.base, *args], input=stdin, capture_output=True, text=True)
        if res.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout


def _ssl_client(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.path("ca.crt")))
    ctx.load_cert_chain(str(pki.path("admin.crt")), str(pki.path("admin.key")))
    return ctx


def _ssl_insecure() -> ssl.SSLContext:
    # kube-controller-manager and kube-scheduler serve with a self-signed certificate made at start.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def up() -> dict[str, Any]:
    """Start a fresh cluster (stopping any previous one) and return its description."""
    t0 = time.monotonic()
    stale = stop_all(quiet=True)
    if stale:
        log(f"stopped the previous cluster's {', '.join(stale)}")
    for sub in ("etcd", "pki", "pids", "logs", "kwok"):
        shutil.rmtree(STATE / sub, ignore_errors=True)
        (STATE / sub).mkdir(parents=True, mode=0o700)
    # The inputs that need `go` are resolved before anything starts: a missing toolchain fails fast.
    kwok_dir = module_dir("kwok", "sigs.k8s.io/kwok")
    crd_dirs = [module_dir(folder, mod) / sub for folder, mod, sub in CRD_SOURCES]
    topology = yaml.safe_load(TOPOLOGY.read_text())
    nodes = fake_nodes(topology)

    api_port_env = os.environ.get("CAPSTAN_CLUSTER_API_PORT")
    etcd_port, peer_port, api_port, kcm_port, sched_port, kwok_port = free_ports(6)
    if api_port_env:
        if not api_port_env.isdigit() or not 0 < int(api_port_env) < 65536:
            raise ClusterError(f"CAPSTAN_CLUSTER_API_PORT must be a TCP port number, not {api_port_env!r}")
        api_port = int(api_port_env)
        if port_in_use(api_port):
            raise ClusterError(f"port {api_port} (CAPSTAN_CLUSTER_API_PORT) on {HOST} is in use: stop what "
                               "listens there or unset CAPSTAN_CLUSTER_API_PORT to pick a free port")
    pki = Pki(STATE / "pki")
    make_pki(pki)
    server = f"https://{HOST}:{api_port}"
    kubeconfig = STATE / "kubeconfig"
    write_kubeconfig(kubeconfig, pki, "admin", server)
    for identity in ("kube-controller-manager", "kube-scheduler", "kwok"):
        write_kubeconfig(STATE / f"{identity}.kubeconfig", pki, identity, server)

    etcd = start("etcd", [
        "--name=capstan", f"--data-dir={STATE / 'etcd'}",
        f"--listen-client-urls=http://{HOST}:{etcd_port}", f"--advertise-client-urls=http://{HOST}:{etcd_port}",
        f"--listen-peer-urls=http://{HOST}:{peer_port}",
        f"--initial-advertise-peer-urls=http://{HOST}:{peer_port}",
        f"--initial-cluster=capstan=http://{HOST}:{peer_port}",
        # A throwaway test cluster: skip fsync (much faster on shared disks), keep the log quiet.
        "--unsafe-no-fsync=true", "--log-level=warn",
    ])
    wait_http("etcd", etcd, f"http://{HOST}:{etcd_port}/health", None, 30)

    apiserver = start("kube-apiserver", [
        f"--etcd-servers=http://{HOST}:{etcd_port}",
        f"--bind-address={HOST}", f"--advertise-address={HOST}", f"--secure-port={api_port}",
        f"--tls-cert-file={pki.path('apiserver.crt')}",
        f"--tls-private-key-file={pki.path('apiserver.key')}",
        f"--client-ca-file={pki.path('ca.crt')}",
        # The aggregation layer (extension API servers such as metrics-server) and the
        # request-header CA that controller-manager and scheduler read for their own serving.
        f"--requestheader-client-ca-file={pki.path('front-proxy-ca.crt')}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.path('front-proxy-client.crt')}",
        f"--proxy-client-key-file={pki.path('front-proxy-client.key')}",
        "--authorization-mode=Node,RBAC",
        # The default admission plugins (ServiceAccount, webhooks, ResourceQuota, ...) plus NodeRestriction.
        "--enable-admission-plugins=NodeRestriction",
        f"--service-account-issuer={ISSUER}",
        f"--service-account-key-file={pki.path('sa.pub')}",
        f"--service-account-signing-key-file={pki.path('sa.key')}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # The `kubernetes` Service would point at 127.0.0.1, which Endpoints refuse: nothing in this
        # cluster runs in a pod network that would use it.
        "--endpoint-reconciler-type=none",
        "--allow-privileged=true", "--profiling=false",
    ])
    wait_http("kube-apiserver", apiserver, f"{server}/readyz", _ssl_client(pki), 90)
    t_api = time.monotonic()

    kcm = start("kube-controller-manager", [
        f"--kubeconfig={STATE / 'kube-controller-manager.kubeconfig'}",
        f"--authentication-kubeconfig={STATE / 'kube-controller-manager.kubeconfig'}",
        f"--authorization-kubeconfig={STATE / 'kube-controller-manager.kubeconfig'}",
        f"--bind-address={HOST}", f"--secure-port={kcm_port}", "--leader-elect=false",
        # Every default controller (garbage collector, deployment, replicaset, serviceaccount,
        # serviceaccount-token, namespace, job, node lifecycle, ...), each with its own
        # ServiceAccount's credentials as in kubeadm clusters.
        "--controllers=*", "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.path('sa.key')}",
        f"--root-ca-file={pki.path('ca.crt')}",
        f"--cluster-signing-cert-file={pki.path('ca.crt')}",
        f"--cluster-signing-key-file={pki.path('ca.key')}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--cluster-name=capstan",
    ])
    scheduler = start("kube-scheduler", [
        f"--kubeconfig={STATE / 'kube-scheduler.kubeconfig'}",
        f"--authentication-kubeconfig={STATE / 'kube-scheduler.kubeconfig'}",
        f"--authorization-kubeconfig={STATE / 'kube-scheduler.kubeconfig'}",
        f"--bind-address={HOST}", f"--secure-port={sched_port}", "--leader-elect=false",
    ])

    kubectl = Kubectl(kubeconfig)
    # kwok's upstream RBAC (ServiceAccount, ClusterRole, binding, FlowSchema), applied as kustomize does.
    kubectl("apply", "-k", str(kwok_dir / "kustomize" / "rbac"))
    stage_args = [f"--config={kwok_dir / stage}" for stage in KWOK_STAGES]
    kwok = start("kwok", [
        f"--kubeconfig={STATE / 'kwok.kubeconfig'}",
        f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
        # Leases keep the node lifecycle controller from marking the fake nodes unreachable.
        "--node-lease-duration-seconds=40",
        f"--server-address={HOST}:{kwok_port}",
        *stage_args,
    ], env={"HOME": str(STATE / "kwok")})  # kwok also loads ~/.kwok/kwok.yaml: not someone's own stages
    for crd_dir in crd_dirs:
        # Server-side: the Gateway API CRDs are too large for client-side apply's annotation.
        kubectl("apply", "--server-side", "--force-conflicts", "-k", str(crd_dir))
    kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(nodes))

    wait_http("kube-controller-manager", kcm, f"https://{HOST}:{kcm_port}/healthz", _ssl_insecure(), 60)
    wait_http("kube-scheduler", scheduler, f"https://{HOST}:{sched_port}/healthz", _ssl_insecure(), 60)
    wait_http("kwok", kwok, f"http://{HOST}:{kwok_port}/healthz", None, 60)
    kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=60s")
    # Pods need the namespace's `default` ServiceAccount (ServiceAccount admission): wait for the
    # controller to make it, so the first pod of a test does not race it.
    _wait_for(lambda: kubectl("get", "serviceaccount", "default", "-n", "default", "-o", "name"), 60,
              "the default ServiceAccount (serviceaccount controller)")

    info = {
        "server": server,
        "kubeconfig": str(kubeconfig),
        "nodes": len(nodes),
        "ports": {"etcd": etcd_port, "etcd-peer": peer_port, "kube-apiserver": api_port,
                  "kube-controller-manager": kcm_port, "kube-scheduler": sched_port, "kwok": kwok_port},
        "seconds": {"apiserver_ready": round(t_api - t0, 1), "total": round(time.monotonic() - t0, 1)},
    }
    (STATE / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except ClusterError as exc:
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}: {exc}") from exc
        time.sleep(0.5)


def status() -> dict[str, bool]:
    """Which components of the recorded cluster run."""
    return {name: (pid := _recorded_pid(name)) is not None and _ours(pid) for name in COMPONENTS}


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `run` stops the cluster when CI cancels the job."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: up, down, status, restart COMPONENT..., run -- CMD."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start a fresh cluster")
    sub.add_parser("down", help="stop the cluster")
    sub.add_parser("status", help="which components run")
    again = sub.add_parser("restart", help="stop and start components of a running cluster (data stays)")
    again.add_argument("--kill", action="store_true", help="SIGKILL them instead of SIGTERM (a crash)")
    again.add_argument("components", nargs="+", metavar="COMPONENT", help=", ".join(COMPONENTS))
    run = sub.add_parser("run", help="up, run a command with KUBECONFIG set, down")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    STATE.mkdir(parents=True, exist_ok=True)
    try:
        if args.cmd == "down":
            if not stop_all():
                log("no cluster was running")
            return 0
        if args.cmd == "status":
            states = status()
            for name, running in states.items():
                print(f"{name}: {'running' if running else 'stopped'}")
            return 0 if all(states.values()) else 1
        if args.cmd == "restart":
            took = restart(args.components, signal.SIGKILL if args.kill else signal.SIGTERM)
            log("restarted " + ", ".join(f"{name} (healthy after {s}s)" for name, s in took.items()))
            return 0
        if args.cmd == "up":
            try:
                info = up()
            except BaseException:
                stop_all(quiet=True)
                raise
            log(f"ready in {info['seconds']['total']}s: {info['server']}, {info['nodes']} fake GPU nodes")
            print(f"export KUBECONFIG={info['kubeconfig']}\nkubectl get nodes\n"
                  f"# logs: {STATE / 'logs'}; stop with `make cluster-down`")
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("run needs a command after --")
        with _terminate_on_sigterm():
            try:
                info = up()
                log(f"ready in {info['seconds']['total']}s: {info['server']}")
                # CAPSTAN_E2E=1: the cluster was just started, so an e2e test that cannot reach it
                # fails instead of skipping (tests/e2e/conftest.py).
                env = {**os.environ, "KUBECONFIG": info["kubeconfig"], "CAPSTAN_E2E": "1"}
                child = subprocess.Popen(command, env=env)
                try:
                    return child.wait()
                finally:  # SIGTERM or Ctrl-C while the command runs: it stops too
                    if child.poll() is None:
                        child.terminate()
                        try:
                            child.wait(timeout=10)
                        except subprocess.TimeoutExpired:
                            child.kill()
            finally:
                stop_all()
    except ClusterError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
