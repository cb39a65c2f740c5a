#!/usr/bin/env bash
# The base image the Dockerfile builds on (its BASE_IMAGE argument); prints its name on stdout.
#
# python:3.11-slim when the engine has it or can pull it. Where no registry is reachable, a Debian
# bookworm "minbase" with python3 (3.11, the version the host's wheels are built for), made with
# debootstrap from the Debian mirror apt on this machine uses and turned into an image with
# `docker import`. The image is kept in the engine and its root filesystem as a tarball in the cache,
# so either is reused by later runs.
#
# Settings (environment): DSI_BASE_IMAGE (use this image, no questions asked), DSI_E2E_CACHE
# (default ~/.cache/dsi-e2e), DSI_DEBIAN_MIRROR (default: apt's own), DSI_PYTHON_VERSION (3.11).
set -euo pipefail

PY_VERSION="${DSI_PYTHON_VERSION:-3.11}"
CACHE="${DSI_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dsi-e2e}"
UPSTREAM="python:${PY_VERSION}-slim"
SUITE=bookworm  # its python3 is 3.11, the Python the wheelhouse and the image share
LOCAL="dsi-base:${SUITE}-python3"
TARBALL="$CACHE/base/${SUITE}-python3.tar"

log() { printf 'base-image: %s\n' "$*" >&2; }

if [[ -n "${DSI_BASE_IMAGE:-}" ]]; then
  echo "$DSI_BASE_IMAGE"
  exit 0
fi
for image in "$UPSTREAM" "$LOCAL"; do
  if docker image inspect "$image" >/dev/null 2>&1; then
    log "using $image (already in the engine)"
    echo "$image"
    exit 0
  fi
done
if timeout 120 docker pull --quiet "$UPSTREAM" >/dev/null 2>&1; then
  log "pulled $UPSTREAM"
  echo "$UPSTREAM"
  exit 0
fi
log "$UPSTREAM cannot be pulled: making $LOCAL with debootstrap"
[[ "$PY_VERSION" == 3.11 ]] || { log "the Debian base has Python 3.11, not $PY_VERSION"; exit 1; }

mirror() {
  if [[ -n "${DSI_DEBIAN_MIRROR:-}" ]]; then echo "$DSI_DEBIAN_MIRROR"; return; fi
  local uri
  # deb822 sources first (URIs: ...), then one-line ones (deb URI SUITE ...); not the security archive.
  uri="$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v -- '-security' | head -n 1 || true)"
  if [[ -z "$uri" ]]; then
    uri="$(awk '$1 == "deb" && $2 !~ /^\[/ { print $2 } $1 == "deb" && $2 ~ /^\[/ { print $3 }' \
      /etc/apt/sources.list 2>/dev/null | grep -v -- '-security' | head -n 1 || true)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

if [[ ! -s "$TARBALL" ]]; then
  [[ "$(id -u)" == 0 ]] || { log "debootstrap needs root"; exit 1; }
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null 2>&1 || {
      DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
    }
  fi
  mkdir -p "$CACHE/base"
  root="$(mktemp -d "$CACHE/base/rootfs.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  url="$(mirror)"
  log "debootstrap --variant=minbase $SUITE from $url"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" "$url" >"$CACHE/base/debootstrap.log" 2>&1 || {
    tail -n 30 "$CACHE/base/debootstrap.log" >&2
    exit 1
  }
  # What an image does not need: downloaded packages, apt lists, docs, man pages, locales.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/var/log/*.log \
    "$root"/tmp/* "$root"/root/.cache
  # Device nodes and /proc stay empty: the engine provides them in each container.
  rm -rf "${root:?}"/dev/* "${root:?}"/proc/*
  tar --numeric-owner --xattrs -C "$root" -cf "$TARBALL.tmp" .
  mv -f "$TARBALL.tmp" "$TARBALL"
  rm -rf "$root"
  trap - EXIT
fi
log "docker import $TARBALL as $LOCAL"
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $SUITE + python3, python3-venv, ca-certificates" \
  "$TARBALL" "$LOCAL" >/dev/null
echo "$LOCAL"
