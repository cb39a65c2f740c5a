#!/usr/bin/env bash
# The e2e tier (`make e2e`; .ci/run runs it after `make test`): a Docker engine (found, or a private
# one started by scripts/docker-engine.sh where it may be), the base image, the wheelhouse, the image
# (scripts/build-image.sh), then tests/e2e: `docker compose ... up --build --wait`, the checks, and
# `docker compose down`. Prints the time of each phase, the image size and `docker compose ps`.
#
# Where no engine can be had, the tests still run and skip, saying why (exit 0). Whatever happens,
# the engine this script started is stopped on exit.
#
# Settings (environment): DSI_E2E_PIP_SOURCE (wheelhouse: every wheel from the host, no network in
# the build, the default where the venv's Python is 3.11; index: PyPI and the PyTorch index),
# DSI_E2E_OUT (results, default build/e2e), and those of scripts/docker-engine.sh.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${DSI_E2E_OUT:-$PWD/build/e2e}"
export DSI_E2E_OUT="$OUT"
rm -rf "$OUT"
mkdir -p "$OUT"
TIMINGS="$OUT/timings.txt"
: >"$TIMINGS"

log() { printf '\n=== e2e: %s\n' "$*" >&2; }
record() { printf '%s\t%s\n' "$1" "$2" >>"$TIMINGS"; }

# --- engine -------------------------------------------------------------------------------------------
log "Docker engine"
t0=$SECONDS
set +e
engine_env="$(scripts/docker-engine.sh up 2>"$OUT/engine.err")"
rc=$?
set -e
cat "$OUT/engine.err" >&2
if [[ $rc == 3 ]]; then
  reason="$(grep '^no Docker engine' "$OUT/engine.err" | tail -n 1)"
  log "skipping the e2e tier: ${reason:-no Docker engine}"
  DSI_E2E_UNAVAILABLE="${reason:-no Docker engine}" "$PY" -m pytest -q -m e2e tests/e2e
  exit $?
elif [[ $rc != 0 ]]; then
  log "no Docker engine could be started (exit $rc)"
  exit "$rc"
fi
trap 'scripts/docker-engine.sh down' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
eval "$engine_env"
record "engine (find, or install + start dockerd; Compose v2)" $((SECONDS - t0))
docker version --format 'engine: Docker {{.Server.Version}} (API {{.Server.APIVersion}})' >&2
docker compose version >&2

# --- image ----------------------------------------------------------------------------------------------
source="${DSI_E2E_PIP_SOURCE:-}"
if [[ -z "$source" ]]; then
  pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  source=$([[ "$pyver" == 3.11 ]] && echo wheelhouse || echo index)
fi
if [[ "$source" == wheelhouse ]]; then
  log "base image"
  t0=$SECONDS
  scripts/base-image.sh >/dev/null
  record "base image (python:3.11-slim, or debootstrap + docker import; reused when present)" $((SECONDS - t0))
  log "wheelhouse"
  t0=$SECONDS
  scripts/wheelhouse.sh >/dev/null
  record "wheelhouse (pip wheel on the host; reused when present)" $((SECONDS - t0))
fi
log "image ($source)"
t0=$SECONDS
build_args=(--env-file "$OUT/image.env")
[[ "$source" == wheelhouse ]] && build_args+=(--wheelhouse)
if ! scripts/build-image.sh "${build_args[@]}" >"$OUT/build.log" 2>&1; then
  tail -n 80 "$OUT/build.log" >&2
  exit 1
fi
grep '^build-image:' "$OUT/build.log" >&2 || true
record "image build (dsi:cpu, $source; cached layers reused)" $((SECONDS - t0))
set -a
# shellcheck disable=SC1091
. "$OUT/image.env"
set +a
docker image inspect --format '{{.Size}}' "$DSI_IMAGE" | awk '{ printf "%.0f MB\n", $1 / 1e6 }' >"$OUT/image-size.txt"

# --- tests ----------------------------------------------------------------------------------------------
log "tests/e2e"
t0=$SECONDS
set +e
timeout --kill-after=30 3000 "$PY" -m pytest -m e2e tests/e2e -v -rA --durations=0 -p no:cacheprovider
rc=$?
set -e
record "tests/e2e (compose up, checks, scale, faults, down)" $((SECONDS - t0))

# The private engine's data-root is a cache: keep what the next run reuses (the images, recent build
# layers), drop what it will not (superseded images, old build cache).
if [[ "$DOCKER_HOST" == "unix://${DSI_DOCKER_RUN:-/tmp/dsi-docker-$(id -u)}/docker.sock" ]]; then
  docker image prune -f >/dev/null 2>&1 || true
  docker builder prune -f --keep-storage "${DSI_E2E_BUILD_CACHE:-4GB}" >/dev/null 2>&1 || true
fi

log "summary"
echo "image $DSI_IMAGE: $(cat "$OUT/image-size.txt")"
echo "phase times (s):"
sed 's/^/  /' "$TIMINGS"
if [[ -s "$OUT/compose-ps.txt" ]]; then
  echo "docker compose ps (after up --wait):"
  cat "$OUT/compose-ps.txt"
fi
if [[ $rc == 5 ]]; then
  echo "e2e: pytest ran no test although an engine answers" >&2
fi
exit "$rc"
