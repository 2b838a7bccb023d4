#!/usr/bin/env bash
# fedtextseg deployment: start the federation's Flower SuperLink (the server side) with TLS and SuperNode
# authentication. It runs in the foreground (run it under systemd, tmux or nohup); Ctrl-C / SIGTERM stops it.
#
# In Flower 1.41 one HTTPS port serves the SuperNodes (Fleet API, /v1/fleet/...), the operator's `flwr` CLI
# (Control API, /v1/control/...) and the ServerApp (Runtime API, /v1/runtime/...). The ServerApp (aggregation,
# checkpoints, results) runs on this machine, in a process the SuperLink starts for each `flwr run`.
#
# State (registered SuperNodes, runs) is kept in STATE_DIR/superlink.db, so registrations survive a restart.
# Runtime dependency installation is disabled: the ServerApp runs in this machine's Python environment, which
# must have fedtextseg installed (`make install`).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: start_superlink.sh CERTS_DIR [--host HOST] [--port PORT] [--state-dir DIR] [-- FLOWER_SUPERLINK_ARGS...]

  CERTS_DIR        made by make_certs.sh: ca.crt, server.crt, server.key are used
  --host HOST      address to listen on (default 0.0.0.0: every interface; 127.0.0.1 for a local test)
  --port PORT      the one HTTPS port of the SuperLink (default 9092); open it to the sites and the operator only
  --state-dir DIR  where superlink.db goes (default $FLWR_HOME/superlink, FLWR_HOME defaulting to ~/.flwr)
  after --          passed to flower-superlink as they are (e.g. --log-file /var/log/fedtextseg/superlink.log)
EOF
}

if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
if [[ $1 == -h || $1 == --help ]]; then usage; exit 0; fi
CERTS=$1; shift
HOST=0.0.0.0; PORT=9092; STATE="${FLWR_HOME:-$HOME/.flwr}/superlink"; EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --host) HOST=${2:?--host needs a value}; shift 2 ;;
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --state-dir) STATE=${2:?--state-dir needs a value}; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start_superlink.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

for f in ca.crt server.crt server.key; do
  [[ -f $CERTS/$f ]] || { echo "start_superlink.sh: $CERTS/$f is missing (run make_certs.sh first)" >&2; exit 2; }
done
command -v flower-superlink >/dev/null || {
  echo "start_superlink.sh: flower-superlink not found; activate the project's environment (.venv)" >&2; exit 2; }
CERTS=$(cd "$CERTS" && pwd)   # absolute: the SuperLink hands the CA path to the SuperExec it starts
mkdir -p "$STATE"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

echo "start_superlink.sh: SuperLink on https://$HOST:$PORT, state $STATE/superlink.db" >&2
exec flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth \
  --host "$HOST" --port "$PORT" \
  --database "$STATE/superlink.db" \
  --disable-runtime-dependency-installation \
  "${EXTRA[@]+"${EXTRA[@]}"}"
