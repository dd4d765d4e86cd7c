#!/usr/bin/env bash
# Build the binaries of capgate's local test cluster (kube-apiserver, kubectl, etcd, helm, and the
# node: kubelet, kube-proxy, kube-scheduler, kube-controller-manager, and CoreDNS for its cluster DNS)
# from the Go module proxy, into ${CAPGATE_CACHE:-$HOME/.cache/capgate}/bin/<kube version>/.
#
# Why build instead of download: CI and dev machines reach package registries only, and the Go
# module proxy is one. Each binary comes from a wrapper module under hack/controlplane/ whose
# go.mod and go.sum are committed, so a build is reproducible.
#
# Only missing (or stale) binaries are built; a second run prints "cached" and exits at once.
#
# Usage:
#   bash hack/build-controlplane.sh              build what is missing
#   bash hack/build-controlplane.sh --print-dir  print the binary directory and exit
#   bash hack/build-controlplane.sh --update-modules
#                                                regenerate the wrapper go.mod/go.sum files
# Environment:
#   CAPGATE_CACHE       cache root (default $HOME/.cache/capgate)
#   GOMODCACHE, GOCACHE honoured when set; otherwise kept under $CAPGATE_CACHE/go/
#   GOBUILD_PARALLEL    go build -p (default 2: the reference machine has 2 cores)
set -euo pipefail
trap 'printf "build-controlplane: FAILED (line %s, exit %s)\n" "$LINENO" "$?" >&2' ERR

# Versions. KUBE_VERSION must match hack/controlplane/kube/go.mod; the commits and dates are the
# upstream tags' (from the module proxy's .info), stamped so `/version` reports a real release.
KUBE_VERSION=v1.35.8
KUBE_COMMIT=1c2e10a409eb1b03f2f28f401ce935312e20d9fb
KUBE_BUILD_DATE=2026-08-20T15:16:14Z
STAGING_VERSION=v0.35.8
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0
HELM_COMMIT=144ca65f8501953fa8b41cd1d37c7223051c85b7
HELM_K8S_MINOR=37 # helm v3.22.0 is built against k8s.io/client-go v0.37 (helm's Makefile stamps it)
COREDNS_VERSION=v1.15.0

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
modules=$here/controlplane
cache=${CAPGATE_CACHE:-$HOME/.cache/capgate}
bindir=$cache/bin/$KUBE_VERSION

log() { printf 'build-controlplane: %s\n' "$*" >&2; }

# The stamp of a binary: a hash of its wrapper module and of its version lines in this script, so
# a bumped version or go.sum rebuilds that binary and nothing else.
stamp_of() {
	local module=$1 prefix
	case $module in
	kube) prefix='KUBE_|STAGING_' ;;
	etcd) prefix='ETCD_' ;;
	helm) prefix='HELM_' ;;
	coredns) prefix='COREDNS_' ;;
	esac
	{
		cat "$modules/$module/go.mod" "$modules/$module/go.sum"
		grep -E "^($prefix)[A-Z_]*=" "${BASH_SOURCE[0]}"
	} | sha256sum | cut -d' ' -f1
}

module_of() {
	case $1 in
	kube-apiserver | kubectl | kubelet | kube-proxy | kube-scheduler | kube-controller-manager) echo kube ;;
	etcd) echo etcd ;;
	helm) echo helm ;;
	coredns) echo coredns ;;
	esac
}

is_fresh() {
	local name=$1
	[[ -x $bindir/$name && -f $bindir/.$name.stamp ]] &&
		[[ $(<"$bindir/.$name.stamp") == "$(stamp_of "$(module_of "$name")")" ]]
}

setup_go() {
	if ! command -v go >/dev/null; then
		log "ERROR: the go toolchain is not on PATH (need go >= 1.26 to build the control plane)"
		exit 1
	fi
	export GOMODCACHE=${GOMODCACHE:-$cache/go/mod}
	export GOCACHE=${GOCACHE:-$cache/go/build}
	# -modcacherw: the module cache stays deletable with plain rm -rf.
	export GOFLAGS="-mod=mod -modcacherw"
	export CGO_ENABLED=0
	export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
}

update_modules() {
	setup_go
	log "regenerating wrapper modules (kubernetes $KUBE_VERSION, staging $STAGING_VERSION)"
	local kmod
	kmod=$(cd "$modules/kube" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
		sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
	{
		cat <<EOF
// Wrapper module: builds kube-apiserver, kubectl and the node (kubelet, kube-proxy, kube-scheduler, kube-controller-manager) $KUBE_VERSION from the Go module proxy.
// k8s.io/kubernetes replaces its staging modules with ./staging/... paths that do not exist
// outside its own repository, so this module replaces each one with its published $STAGING_VERSION tag.
// Regenerate with: bash hack/build-controlplane.sh --update-modules (see README.md).
module capgate.dev/hack/controlplane/kube

go 1.26

tool (
	k8s.io/kubernetes/cmd/kube-apiserver
	k8s.io/kubernetes/cmd/kube-controller-manager
	k8s.io/kubernetes/cmd/kube-proxy
	k8s.io/kubernetes/cmd/kube-scheduler
	k8s.io/kubernetes/cmd/kubectl
	k8s.io/kubernetes/cmd/kubelet
)

require k8s.io/kubernetes $KUBE_VERSION

replace (
EOF
		# Every staging replace of k8s.io/kubernetes, except modules that are never part of its
		# build graph and whose tags the proxy may not hold (the sample-* examples).
		sed -n '/^replace (/,/^)/p' "$kmod" | grep '=> ./staging/' |
			grep -v -e sample-cli-plugin -e sample-controller |
			awk -v v="$STAGING_VERSION" '{print "\t" $1 " => " $1 " " v}'
		echo ")"
	} >"$modules/kube/go.mod"
	: >"$modules/kube/go.sum"
	(cd "$modules/kube" && go mod tidy)
	(cd "$modules/etcd" && go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy)
	(cd "$modules/helm" && go get -tool "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" && go mod tidy)
	# CoreDNS: main.go imports the plugins; only the version is pinned here.
	(cd "$modules/coredns" && go get "github.com/coredns/coredns@$COREDNS_VERSION" && go mod tidy)
	log "done; commit hack/controlplane/*/go.mod and go.sum"
}

build_one() {
	local name=$1 module pkg ldflags start
	module=$(module_of "$name")
	case $name in
	kube-apiserver | kubectl | kubelet | kube-proxy | kube-scheduler | kube-controller-manager)
		pkg=k8s.io/kubernetes/cmd/$name
		ldflags=""
		local p
		# kube-apiserver reads component-base/version, kubectl also client-go/pkg/version.
		for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
			ldflags+=" -X $p.gitVersion=$KUBE_VERSION"
			ldflags+=" -X $p.gitMajor=$(cut -d. -f1 <<<"${KUBE_VERSION#v}")"
			ldflags+=" -X $p.gitMinor=$(cut -d. -f2 <<<"$KUBE_VERSION")"
			ldflags+=" -X $p.gitCommit=$KUBE_COMMIT"
			ldflags+=" -X $p.gitTreeState=clean"
			ldflags+=" -X $p.buildDate=$KUBE_BUILD_DATE"
		done
		;;
	etcd)
		pkg=go.etcd.io/etcd/server/v3
		ldflags=""
		;;
	helm)
		pkg=helm.sh/helm/v3/cmd/helm
		ldflags=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
		ldflags+=" -X helm.sh/helm/v3/internal/version.gitCommit=$HELM_COMMIT"
		ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
		local p
		for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
			ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$HELM_K8S_MINOR"
		done
		;;
	coredns)
		pkg=. # the wrapper's own main.go
		ldflags=" -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
		;;
	esac
	log "building $name ($pkg) ..."
	start=$SECONDS
	local tmp=$bindir/.$name.tmp.$$
	(cd "$modules/$module" && go build -p "${GOBUILD_PARALLEL:-2}" -trimpath \
		-ldflags "-s -w$ldflags" -o "$tmp" "$pkg")
	mv -f "$tmp" "$bindir/$name"
	stamp_of "$module" >"$bindir/.$name.stamp"
	log "built $name in $((SECONDS - start))s -> $bindir/$name"
}

main() {
	case ${1:-} in
	--print-dir)
		echo "$bindir"
		return
		;;
	--update-modules)
		update_modules
		return
		;;
	"") ;;
	*)
		log "unknown argument: $1 (see the header of this script)"
		exit 2
		;;
	esac

	local names=(kube-apiserver kubectl etcd helm kube-controller-manager kube-scheduler kube-proxy kubelet coredns) missing=() name
	for name in "${names[@]}"; do
		is_fresh "$name" || missing+=("$name")
	done
	if ((${#missing[@]} == 0)); then
		log "cached: ${names[*]} in $bindir"
		return
	fi

	mkdir -p "$bindir"
	# One builder at a time (parallel test sessions, CI jobs sharing a cache).
	exec 9>"$bindir/.lock"
	if ! flock -n 9; then
		log "another build holds $bindir/.lock; waiting ..."
		flock 9
	fi
	setup_go
	log "go: $(go version); GOMODCACHE=$GOMODCACHE GOCACHE=$GOCACHE"
	local total=$SECONDS
	for name in "${names[@]}"; do
		if is_fresh "$name"; then
			log "cached: $name"
		else
			build_one "$name"
		fi
	done
	rm -f "$bindir"/.*.tmp.* 2>/dev/null || true
	log "all binaries ready in $bindir (${SECONDS}s total, $((SECONDS - total))s building)"
}

main "$@"
