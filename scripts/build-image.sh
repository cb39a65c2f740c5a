#!/usr/bin/env bash
# Build the DSI image (`make image` calls this), either way:
#
#   scripts/build-image.sh                  # python:3.11-slim + PyPI + the PyTorch wheel index
#   scripts/build-image.sh --wheelhouse     # no network in the build: the base image from
#                                           # scripts/base-image.sh (python:3.11-slim if it can be
#                                           # had, else debootstrap), every wheel from the host
#                                           # (scripts/wheelhouse.sh), imported as an image
#
# Options: -t TAG (default dsi:cpu), --torch-variant cpu|cuda|cuXYZ (index builds; default cpu),
# --env-file FILE (write the DSI_* variables that make `docker compose ... up --build` build the same
# image, so its build is all cache hits). Extra arguments after `--` go to the builder.
#
# The builder: `docker buildx build` where buildx exists; else a docker CLI older than 23 with
# DOCKER_BUILDKIT=1 (Debian's docker.io ships one); else `docker compose build`, which brings its own
# BuildKit client. All of them use the engine's BuildKit, so layers are cached in the engine.
set -euo pipefail

cd "$(dirname "$0")/.."
tag=dsi:cpu
source=index
variant=cpu
env_file=""
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheelhouse) source=wheelhouse ;;
    --index) source=index ;;
    -t | --tag) tag="$2"; shift ;;
    --torch-variant) variant="$2"; shift ;;
    --env-file) env_file="$2"; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "build-image: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf 'build-image: %s\n' "$*" >&2; }

args=(--build-arg "TORCH_VARIANT=$variant")
vars=()
if [[ "$source" == wheelhouse ]]; then
  base="$(scripts/base-image.sh)"
  wheels="$(scripts/wheelhouse.sh)"
  wheel_image="dsi-wheelhouse:$(basename "$wheels")"
  if ! docker image inspect "$wheel_image" >/dev/null 2>&1; then
    log "docker import $wheels as $wheel_image"
    tar -C "$wheels" --exclude .complete -c . | docker import --message "wheels for an offline DSI build" - "$wheel_image" >/dev/null
  fi
  # Wheelhouse images of older requirements are not used again.
  docker images dsi-wheelhouse --format '{{.Repository}}:{{.Tag}}' | grep -vxF "$wheel_image" | xargs -r docker rmi >/dev/null 2>&1 || true
  args+=(--build-arg "BASE_IMAGE=$base" --build-arg PIP_SOURCE=wheelhouse --build-arg "WHEELHOUSE_IMAGE=$wheel_image")
  vars=("DSI_BASE_IMAGE=$base" "DSI_PIP_SOURCE=wheelhouse" "DSI_WHEELHOUSE_IMAGE=$wheel_image")
fi

cli_major() { "$1" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1; }

started=$SECONDS
if docker buildx version >/dev/null 2>&1; then
  log "docker buildx build -t $tag ($source)"
  docker buildx build --load -t "$tag" "${args[@]}" "${extra[@]}" .
else
  legacy=""
  for cli in "$(command -v docker)" /usr/bin/docker; do
    major="$(cli_major "$cli" || true)"
    if [[ -x "$cli" && -n "$major" && "$major" -lt 23 ]]; then legacy="$cli"; break; fi
  done
  if [[ -n "$legacy" ]]; then
    log "DOCKER_BUILDKIT=1 $legacy build -t $tag ($source)"
    DOCKER_BUILDKIT=1 "$legacy" build -t "$tag" "${args[@]}" "${extra[@]}" .
  elif docker compose version >/dev/null 2>&1; then
    log "docker compose build -t $tag ($source; no buildx here)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    {
      echo "services:"
      echo "  image:"
      echo "    image: \"$tag\""
      echo "    build:"
      echo "      context: \"$PWD\""
      echo "      args:"
      for ((i = 1; i < ${#args[@]}; i += 2)); do
        echo "        ${args[i]%%=*}: \"${args[i]#*=}\""
      done
    } >"$tmp/compose.yml"
    docker compose -p dsi-image-build -f "$tmp/compose.yml" build "${extra[@]}"
  else
    log "no BuildKit builder: install docker buildx (or Compose v2), or use scripts/docker-engine.sh"
    exit 1
  fi
fi
log "built $tag in $((SECONDS - started)) s: $(docker image inspect --format '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
if [[ -n "$env_file" ]]; then
  mkdir -p "$(dirname "$env_file")"
  { echo "DSI_IMAGE=$tag"; for v in "${vars[@]}"; do echo "$v"; done; } >"$env_file"
fi
