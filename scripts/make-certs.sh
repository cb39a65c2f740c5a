#!/usr/bin/env bash
# Certificates for a DSI cluster with TLS everywhere and mutual TLS inside (docs/security.md), made with
# openssl into DIR:
#
#   ca.crt, ca.key                     the public CA: signs the orchestrator's server certificate and the
#                                      clients' certificates (SDK, CLI, gateway)
#   orchestrator.crt, orchestrator.key the orchestrator's server certificate
#   client.crt, client.key             a client certificate (for an orchestrator with --tls-client-ca ca.crt)
#   internal-ca.crt, internal-ca.key   the internal CA: signs the model services' certificates and the
#                                      orchestrator's client certificate, so that a client certificate of
#                                      the public CA cannot reach a target or the drafter
#   target.crt, target.key             every target's server certificate
#   drafter.crt, drafter.key           the drafter's server certificate
#   orchestrator-client.crt, .key      the orchestrator's client certificate towards the model services
#   api-keys                           one random API key (only when DIR has none)
#
# Server certificates name localhost, 127.0.0.1 and ::1, the docker compose names (targets, target-0,
# target-1, drafter, orchestrator) and the Kubernetes Services (dsi-target, dsi-drafter,
# dsi-orchestrator, and their NAMESPACE.svc names with --namespace), plus every --host; they may also
# be used as client certificates, so a service can check its own health over mutual TLS.
#
# Run it again to renew every certificate: the CAs in DIR are kept (clients keep their ca.crt) unless
# --new-ca. Keys and api-keys are written with mode 600; --key-mode 644 makes them readable by the
# containers' user (uid 10001) when docker compose mounts them (or chown them to 10001 instead). The CA
# keys (ca.key, internal-ca.key) stay 600 and are never mounted anywhere: keep DIR private.
#
#   scripts/make-certs.sh certs
#   scripts/make-certs.sh --host dsi.example.com --host 10.0.0.7 --namespace dsi certs
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  echo "usage: $0 [--host NAME]... [--namespace NS] [--days N] [--key-mode MODE] [--new-ca] DIR"
}

dir="" days=825 key_mode=600 new_ca=0 namespace=""
hosts=()
while (($#)); do
  case "$1" in
    --host) hosts+=("${2:?--host needs a name}"); shift 2 ;;
    --namespace) namespace="${2:?--namespace needs a name}"; shift 2 ;;
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    --key-mode) key_mode="${2:?--key-mode needs a mode}"; shift 2 ;;
    --new-ca) new_ca=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "make-certs.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [[ -z "$dir" ]] || { echo "make-certs.sh: one DIR only" >&2; exit 2; }; dir="$1"; shift ;;
  esac
done
[[ -n "$dir" ]] || { usage >&2; exit 2; }
[[ "$key_mode" =~ ^[0-7]{3,4}$ ]] || { echo "make-certs.sh: --key-mode wants an octal mode, got $key_mode" >&2; exit 2; }
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is needed" >&2; exit 1; }

umask 077
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

san_entry() {  # an IP address or a DNS name, as a subjectAltName entry
  if [[ "$1" =~ ^[0-9.]+$ || "$1" == *:* ]]; then echo "IP:$1"; else echo "DNS:$1"; fi
}

sans() {  # sans NAME...: the common names plus NAME..., comma-separated
  local out=() name
  for name in localhost 127.0.0.1 ::1 "$@" ${hosts[@]+"${hosts[@]}"}; do
    out+=("$(san_entry "$name")")
  done
  (IFS=,; echo "${out[*]}")
}

k8s() {  # k8s SERVICE: the Service's name and, with --namespace, its longer names
  echo "$1"
  if [[ -n "$namespace" ]]; then
    echo "$1.$namespace" "$1.$namespace.svc" "$1.$namespace.svc.cluster.local"
  fi
}

new_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

make_ca() {  # make_ca NAME CN
  local name="$1" cn="$2"
  if [[ -f "$dir/$name.crt" && -f "$dir/$name.key" && $new_ca -eq 0 ]]; then
    echo "keeping $dir/$name.crt"
    return
  fi
  new_key "$dir/$name.key"
  cat >"$work/$name.cnf" <<EOF
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = $cn
[ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  openssl req -new -x509 -key "$dir/$name.key" -config "$work/$name.cnf" -days "$days" \
    -set_serial "0x$(openssl rand -hex 16)" -out "$dir/$name.crt"
  echo "made $dir/$name.crt"
}

make_cert() {  # make_cert NAME CA CN USAGE [SAN]: USAGE is server (server + client) or client
  local name="$1" ca="$2" cn="$3" usage="$4" san="${5:-}"
  new_key "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "/CN=$cn" -out "$work/$name.csr"
  {
    echo "basicConstraints = critical, CA:FALSE"
    echo "keyUsage = critical, digitalSignature"
    if [[ "$usage" == server ]]; then
      echo "extendedKeyUsage = serverAuth, clientAuth"
      echo "subjectAltName = $san"
    else
      echo "extendedKeyUsage = clientAuth"
    fi
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid"
  } >"$work/$name.ext"
  openssl x509 -req -in "$work/$name.csr" -CA "$dir/$ca.crt" -CAkey "$dir/$ca.key" -days "$days" \
    -set_serial "0x$(openssl rand -hex 16)" -extfile "$work/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  echo "made $dir/$name.crt"
}

make_ca ca "DSI public CA"
make_ca internal-ca "DSI internal CA"
# shellcheck disable=SC2046 # word splitting of k8s's names is wanted
make_cert orchestrator ca dsi-orchestrator server "$(sans orchestrator $(k8s dsi-orchestrator))"
make_cert client ca dsi-client client
# shellcheck disable=SC2046
make_cert target internal-ca dsi-target server "$(sans targets target-0 target-1 $(k8s dsi-target))"
# shellcheck disable=SC2046
make_cert drafter internal-ca dsi-drafter server "$(sans drafter $(k8s dsi-drafter))"
make_cert orchestrator-client internal-ca dsi-orchestrator client

if [[ ! -f "$dir/api-keys" ]]; then
  { echo "# API keys, one per line (the orchestrator's and the gateway's --api-key-file)"; openssl rand -hex 32; } \
    >"$dir/api-keys"
  echo "made $dir/api-keys"
fi

# The CA keys stay private whatever --key-mode says: only this script needs them. The directory stays
# private too; compose and Kubernetes mount single files from it.
chmod "$key_mode" "$dir"/*.key "$dir/api-keys"
chmod 600 "$dir/ca.key" "$dir/internal-ca.key"
chmod 644 "$dir"/*.crt
