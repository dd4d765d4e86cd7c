#!/usr/bin/env bash
# `make image`: the capgate image and a pause image, built here with Debian's docker.io and no registry.
#
#   bash hack/image.sh          build what changed; print "<name> <reference>" per image
#   bash hack/image.sh save     the same, then `docker save` each image to
#                               ~/.cache/capgate/images/<name>-<hash>.tar; print "<name> <reference> <tarball>"
#   bash hack/image.sh ref      print "<name> <reference>" without building (no docker needed)
#
# Progress goes to stderr; stdout carries only those lines, for scripts (e2e/, `ctr images import`).
#
# Why it is built this way:
# - No registry: the Dockerfile's base is a Debian bookworm made here (`debootstrap --variant=minbase`,
#   Python 3.11 from Debian) and `docker import`ed once as capgate.local/debian-python:bookworm-<hash>,
#   the hash of its recipe; it stays in docker's store between runs (`docker rmi` it to take Debian's
#   later updates). The Dockerfile itself keeps `FROM python:3.12-slim` for everyone else (this
#   passes --build-arg PYTHON_IMAGE).
# - Instant when nothing changed: the capgate tag is the hash of every input of the build (the
#   Dockerfile, the build context .dockerignore lets in, the base), so an existing tag is the build.
# - Debian's 20.10 client (/usr/bin/docker) has BuildKit built in, which RUN --mount needs; a newer
#   client without the buildx plugin refuses, so it is called by path (CAPGATE_DOCKER overrides).
# - If no daemon answers and we are root, dockerd is started with --iptables=false --bridge=none and
#   left running like the system service would be: it then never touches the host's iptables (whose
#   FORWARD policy the local node's pod network depends on). Builds use --network=host instead.
# - pip inside the build trusts the host's extra CA certificates (/usr/local/share/ca-certificates,
#   e.g. a TLS-inspecting proxy) through a build secret, which never reaches an image layer.
# - Concurrent runs (several worktrees share one daemon and cache) take turns on a lock file.
set -euo pipefail
cd "$(dirname "$0")/.."

docker=${CAPGATE_DOCKER:-/usr/bin/docker}
cache=${CAPGATE_CACHE:-$HOME/.cache/capgate}
images="$cache/images"
mirror=${CAPGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
extra_ca_dir=${CAPGATE_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
repository=capgate.local/capgate
pause_ref=capgate.local/pause:3.10
keep_tarballs=3  # per image name: a few worktrees' builds, not every build ever saved

say() { echo "==> $*" >&2; }
die() { echo "capgate image: $*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }

# --- what each image is made of (no docker needed) ------------------------------------------------
base_packages=python3,python3-venv,ca-certificates
base_recipe="debootstrap --variant=minbase --include=$base_packages bookworm $mirror"
base_ref="capgate.local/debian-python:bookworm-$(printf '%s\n' "$base_recipe" | sha)"

# Every file the build sees: the Dockerfile and exactly what .dockerignore lets into the context.
context_files() {
  printf '%s\n' Dockerfile .dockerignore pyproject.toml README.md requirements.lock
  find capgate -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.pyo'
}
capgate_hash() {
  { printf 'base %s\n' "$base_ref"
    context_files | LC_ALL=C sort | while read -r file; do
      printf '%s %s\n' "$(sha256sum <"$file" | cut -d' ' -f1)" "$file"
    done
  } | sha
}
pause_cflags="-static -Os -s -Wall -Wextra -Werror"
pause_hash() { { printf '%s\n' "$pause_cflags"; cat hack/pause/pause.c; } | sha; }
capgate_ref="$repository:$(capgate_hash)"

print_refs() {
  echo "capgate $capgate_ref"
  echo "pause $pause_ref"
}

# --- the daemon -----------------------------------------------------------------------------------
ensure_docker() {
  [ -x "$docker" ] || die "$docker not found: install Debian's docker.io (as root: bash hack/host-packages.sh)"
  if "$docker" info >/dev/null 2>&1; then
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "no docker daemon answers at ${DOCKER_HOST:-/var/run/docker.sock}, and only root can start one here"
  command -v dockerd >/dev/null || die "dockerd not found: install Debian's docker.io (bash hack/host-packages.sh)"
  mkdir -p "$cache"
  say "starting dockerd (log: $cache/dockerd.log)"
  # setsid: the daemon outlives this script and is not killed with make's process group. 9>&-: nor does
  # it inherit the image lock, which it would hold for its whole life (every later run then waited).
  setsid dockerd --iptables=false --ip-masq=false --bridge=none </dev/null >>"$cache/dockerd.log" 2>&1 9>&- &
  for _ in $(seq 60); do
    "$docker" info >/dev/null 2>&1 && return
    sleep 0.5
  done
  tail -n 20 "$cache/dockerd.log" >&2
  die "dockerd did not answer within 30 s (log above)"
}

lock_holders() {  # lock_holders FILE: "  <pid> <command>" for each other process with FILE open
  local fd pid
  for fd in /proc/[0-9]*/fd/*; do
    [ "$(readlink "$fd" 2>/dev/null)" = "$1" ] || continue
    pid=${fd#/proc/}; pid=${pid%%/*}
    ours "$pid" || printf '  %s %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
  done | sort -u
}
ours() {  # ours PID: PID is this script or one of its own subshells
  local pid=$1 _
  for _ in 1 2 3 4; do
    [ "$pid" = $$ ] && return 0
    pid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null) || return 1
  done
  return 1
}

exists() { "$docker" image inspect "$1" >/dev/null 2>&1; }

# --- the Debian + Python base ---------------------------------------------------------------------
build_base() {
  if exists "$base_ref"; then
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "building the base image needs root (debootstrap)"
  command -v debootstrap >/dev/null || die "debootstrap not found (as root: bash hack/host-packages.sh)"
  say "base image $base_ref: $base_recipe (once; about 70 s)"
  local rootfs="$tmp/rootfs"
  debootstrap --variant=minbase --include="$base_packages" bookworm "$rootfs" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 || { tail -n 20 "$cache/debootstrap.log" >&2; die "debootstrap failed (log: $cache/debootstrap.log)"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  tar --numeric-owner -C "$rootfs" -c . | "$docker" import \
    --change 'CMD ["python3"]' --change 'LABEL dev.capgate.recipe="'"$base_recipe"'"' - "$base_ref" >/dev/null
}

# --- capgate --------------------------------------------------------------------------------------
build_capgate() {
  if exists "$capgate_ref"; then
    say "capgate image $capgate_ref: up to date"
    return
  fi
  build_base
  say "capgate image $capgate_ref: building FROM $base_ref"
  local secret=() bundle="$tmp/extra-ca.pem" size
  if compgen -G "$extra_ca_dir/*.crt" >/dev/null; then
    cat "$extra_ca_dir"/*.crt >"$bundle"
    secret=(--secret "id=extra-ca,src=$bundle")
  fi
  # A proxy in the environment reaches pip and apt in the build too (predefined ARGs: not in the image).
  local proxy=() name
  for name in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    if [ -n "${!name:-}" ]; then proxy+=(--build-arg "$name"); fi
  done
  local started=$SECONDS
  DOCKER_BUILDKIT=1 "$docker" build --network=host --progress=plain \
    --build-arg "PYTHON_IMAGE=$base_ref" "${secret[@]}" "${proxy[@]}" \
    --label "dev.capgate.inputs=${capgate_ref##*:}" -t "$capgate_ref" . >"$cache/image-build.log" 2>&1 \
    || { tail -n 30 "$cache/image-build.log" >&2; die "docker build failed (log: $cache/image-build.log)"; }
  size=$("$docker" image inspect -f '{{.Size}}' "$capgate_ref")
  say "capgate image built in $((SECONDS - started)) s, $((size / 1000000)) MB"
}

# --- pause ----------------------------------------------------------------------------------------
build_pause() {
  local want
  want=$(pause_hash)
  if [ "$("$docker" image inspect -f '{{index .Config.Labels "dev.capgate.inputs"}}' "$pause_ref" 2>/dev/null)" = "$want" ]; then
    return
  fi
  command -v gcc >/dev/null || die "gcc not found (as root: bash hack/host-packages.sh)"
  say "pause image $pause_ref: gcc -static hack/pause/pause.c"
  local dir="$tmp/pause"
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # the flags are words
  gcc $pause_cflags -o "$dir/pause" hack/pause/pause.c
  # 65535: the user Kubernetes' own pause image runs as.
  tar --numeric-owner --owner=0 --group=0 -C "$dir" -c pause | "$docker" import \
    --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' \
    --change "LABEL dev.capgate.inputs=$want" - "$pause_ref" >/dev/null
}

# --- tarballs for containerd ----------------------------------------------------------------------
save() {  # save NAME REF HASH: print "NAME REF TARBALL"
  local name=$1 ref=$2 hash=$3 tarball
  tarball="$images/$name-$hash.tar"
  if [ ! -s "$tarball" ]; then
    say "docker save $ref -> $tarball"
    "$docker" save -o "$tarball.partial" "$ref"
    mv "$tarball.partial" "$tarball"
  fi
  touch "$tarball"  # the newest are kept
  # shellcheck disable=SC2012  # our own names: no spaces
  ls -t "$images/$name"-*.tar | tail -n +$((keep_tarballs + 1)) | xargs -r rm -f
  echo "$name $ref $tarball"
}

command=${1:-build}
case "$command" in
  ref) print_refs; exit 0 ;;
  build | save) ;;
  *) die "usage: hack/image.sh [build|save|ref]" ;;
esac

mkdir -p "$images"
exec 9>"$cache/image.lock"
if ! flock -w "${CAPGATE_IMAGE_LOCK_WAIT_S:-900}" 9; then
  die "another process has held $cache/image.lock for ${CAPGATE_IMAGE_LOCK_WAIT_S:-900} s:
$(lock_holders "$cache/image.lock")"
fi
# Holding the lock, any other scratch directory is a killed run's: remove it. --one-file-system:
# never descend into a /proc or /dev that a failed debootstrap left mounted.
rm -rf --one-file-system "$cache"/image-tmp.*
tmp=$(mktemp -d "$cache/image-tmp.XXXXXX")
trap 'rm -rf --one-file-system "$tmp"' EXIT
ensure_docker
build_capgate
build_pause
if [ "$command" = save ]; then
  save capgate "$capgate_ref" "${capgate_ref##*:}"
  save pause "$pause_ref" "$(pause_hash)"
else
  print_refs
fi
