//go:build tools

// Package crds only pins modules: it is never built. The imports keep `go mod tidy` from dropping
// the requirements whose config/crd YAML scripts/cluster.py applies.
package crds

import (
	_ "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	_ "sigs.k8s.io/gateway-api/apis/v1"
	_ "sigs.k8s.io/lws/api/leaderworkerset/v1"
)
