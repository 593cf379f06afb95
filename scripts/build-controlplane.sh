#!/usr/bin/env bash
# Build the local Kubernetes control plane from source, pinned by the Go modules under hack/controlplane:
#
#   hack/controlplane/go.mod       kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes)
#   hack/controlplane/etcd/go.mod  etcd (go.etcd.io/etcd/server/v3, the release Kubernetes names)
#   hack/controlplane/kwok/go.mod  kwok (sigs.k8s.io/kwok/cmd/kwok: fakes the kubelets of fake nodes)
#
# The binaries go into a cache outside the repository, one folder per module keyed by its version and
# a hash of its go.mod/go.sum (a fresh clone on the same machine builds nothing), and are symlinked
# into .tools/bin. Idempotent: a complete cache folder is never rebuilt. Concurrent runs take a lock.
#
# Environment: CAPSTAN_TOOLS_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/capstan/tools),
# TOOLS_DIR (default .tools/bin), GO (default go). GOMODCACHE/GOCACHE are Go's own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HACK="$ROOT/hack/controlplane"
BIN="${TOOLS_DIR:-$ROOT/.tools/bin}"
CACHE="${CAPSTAN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/capstan/tools}"
GO="${GO:-go}"
GO_MIN_MINOR=26 # the modules say `go 1.26.0`
# Bump when the build flags below change: it is part of every cache key.
BUILD_REV=1

log() { printf 'build-controlplane: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# The pinned version of a module, read from a go.mod without running go (a cache hit needs no toolchain).
pinned() { # go.mod module
  awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$1"
}

# Cache folder of one module: name-version-hash(go.mod, go.sum, BUILD_REV).
cache_dir() { # name module-dir module-path
  local version hash
  version="$(pinned "$2/go.mod" "$3")"
  [[ -n "$version" ]] || die "$3 is not required by $2/go.mod"
  hash="$(cat "$2/go.mod" "$2/go.sum" <(echo "$BUILD_REV") | sha256sum | cut -c1-10)"
  echo "$CACHE/$1-$version-$hash"
}

need_go() {
  command -v "$GO" >/dev/null || die "go is not on PATH: install Go >= 1.$GO_MIN_MINOR (https://go.dev/dl) or set GO=/path/to/go"
  local v minor
  v="$("$GO" env GOVERSION 2>/dev/null || true)" # e.g. go1.26.8
  [[ "$v" =~ ^go1\.([0-9]+) ]] || die "cannot tell the version of $GO (got '${v}')"
  minor="${BASH_REMATCH[1]}"
  ((minor >= GO_MIN_MINOR)) || die "$GO is $v; building the control plane needs Go >= 1.$GO_MIN_MINOR"
}

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Build the tool packages of one module into its cache folder unless it is already complete.
build_module() { # name module-dir module-path ldflags tags package...
  local name="$1" dir="$2" mod="$3" ldflags="$4" tags="$5"
  shift 5
  local dest
  dest="$(cache_dir "$name" "$dir" "$mod")"
  if [[ -f "$dest/.complete" ]]; then
    log "$name: cached in $dest"
    link "$dest" "$@"
    return 0
  fi
  need_go
  mkdir -p "$CACHE"
  # One builder per module at a time (CI runs may overlap); the loser finds the folder complete.
  exec {lock}>"$dest.lock"
  flock "$lock"
  if [[ ! -f "$dest/.complete" ]]; then
    local tmp t0 t1
    tmp="$(mktemp -d "$dest.tmp.XXXXXX")"
    chmod 755 "$tmp"
    t0="$(now)"
    (cd "$dir" && "$GO" mod download)
    t1="$(now)"
    log "$name: go mod download $(secs "$t0" "$t1")s"
    local pkg
    for pkg in "$@"; do
      t0="$(now)"
      # CGO off, -trimpath, -s -w and these tags: how Kubernetes builds its release server binaries.
      (cd "$dir" && CGO_ENABLED=0 nice -n 10 "$GO" build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" \
        -o "$tmp/$(binname "$pkg")" "${pkg%%=*}")
      t1="$(now)"
      log "$name: built $(binname "$pkg") in $(secs "$t0" "$t1")s"
    done
    touch "$tmp/.complete"
    rm -rf "$dest"
    mv "$tmp" "$dest"
  fi
  flock -u "$lock"
  exec {lock}>&-
  link "$dest" "$@"
}

# A package argument is `import/path` (binary named after its last element) or `import/path=name`.
binname() { [[ "$1" == *=* ]] && echo "${1#*=}" || basename "$1"; }

link() { # cache-folder package...
  local dest="$1" pkg
  shift
  mkdir -p "$BIN"
  for pkg in "$@"; do
    ln -sfn "$dest/$(binname "$pkg")" "$BIN/$(binname "$pkg")"
  done
}

k8s_ldflags() {
  local v major minor
  v="$(pinned "$HACK/go.mod" k8s.io/kubernetes)" # v1.37.2
  major="${v#v}"; major="${major%%.*}"
  minor="${v#v*.}"; minor="${minor%%.*}"
  local key flags=""
  # What kube::version::ldflags sets; without it the binaries report v0.0.0-master.
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    for key in "gitVersion=$v" "gitMajor=$major" "gitMinor=$minor" "gitTreeState=clean" \
      "buildDate=1970-01-01T00:00:00Z"; do
      flags+=" -X $pkg.$key"
    done
  done
  echo "$flags"
}

build_module k8s "$HACK" k8s.io/kubernetes "$(k8s_ldflags)" selinux,notest,grpcnotrace \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler
# etcd's main package is the root of go.etcd.io/etcd/server/v3 (it would be named v3).
build_module etcd "$HACK/etcd" go.etcd.io/etcd/server/v3 "" "" go.etcd.io/etcd/server/v3=etcd
build_module kwok "$HACK/kwok" sigs.k8s.io/kwok "" "" sigs.k8s.io/kwok/cmd/kwok
log "ok: kube-apiserver kube-controller-manager kube-scheduler etcd kwok in $BIN"
