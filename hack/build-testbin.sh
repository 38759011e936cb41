#!/usr/bin/env bash
# Build the local control plane's binaries into a cache outside the repository, keyed by version:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (Kubernetes, through a wrapper
# module that pins every staging module to its published tag), etcd, kwok and helm.
# Reuses whatever is already there; prints the cache directory on stdout.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.7.0}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
CACHE=${MOE_CACHE:-$HOME/.cache/moe-operator}
BIN=${MOE_TESTBIN:-$CACHE/testbin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION}

# The checksum database is not reachable from here; the module proxy is.
export GOSUMDB=${GOSUMDB:-off} GOFLAGS=${GOFLAGS:--mod=mod} CGO_ENABLED=0
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
mkdir -p "$BIN"
log() { echo "build-testbin: $*" >&2; }

if [[ ! -x $BIN/kube-apiserver || ! -x $BIN/kube-scheduler || ! -x $BIN/kube-controller-manager || ! -x $BIN/kubectl ]]; then
  W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
  log "building Kubernetes $K8S_VERSION in $W (cold: about 25 minutes on 2 cores)"
  ( cd "$W"
    go mod init local.test/moe-k8s-testbin >/dev/null 2>&1
    printf '\ngodebug default=go1.24\n' >> go.mod
    KMOD=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
           | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    SV="v0.${K8S_VERSION#v1.}"          # v1.34.4 -> v0.34.4 for every staging module
    for m in $(sed -n 's|^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*|\1|p' "$KMOD"); do
      go mod edit "-replace=$m=$m@$SV"
    done
    go get "k8s.io/kubernetes@$K8S_VERSION" >&2
    MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
    LDF="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      LDF+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$MINOR"
      LDF+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "$LDF" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler \
      k8s.io/kubernetes/cmd/kubectl >&2
  )
fi

if [[ ! -x $BIN/etcd ]]; then
  W=$(mktemp -d)
  log "building etcd $ETCD_VERSION"
  ( cd "$W"
    go mod init local.test/moe-etcd-testbin >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
    go build -trimpath -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2
  )
  rm -rf "$W"
fi

if [[ ! -x $BIN/kwok ]]; then
  log "installing kwok $KWOK_VERSION"
  GOBIN="$BIN" go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >&2
fi

if [[ ! -x $BIN/helm ]]; then
  log "installing helm $HELM_VERSION"
  HMAJ=${HELM_VERSION%%.*}
  GOBIN="$BIN" go install -ldflags "-X helm.sh/helm/$HMAJ/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/$HMAJ/cmd/helm@$HELM_VERSION" >&2
fi

echo "$BIN"
