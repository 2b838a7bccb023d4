#!/usr/bin/env bash
# fedtextseg deployment: register SuperNode public keys on the SuperLink (`flwr supernode register`), so that
# the SuperLink, started with --enable-supernode-auth, accepts exactly those SuperNodes.
#
# Run by the federation operator against a running SuperLink, with a `flwr` CLI connection named SUPERLINK in
# $FLWR_HOME/config.toml (configure_cli.py writes it). A key that is already registered is reported and skipped,
# so the script can be run again after adding a site. Each registration prints the node ID the SuperLink gave
# the site (the ID is tied to the key, so it is stable across SuperNode restarts).
# Remove a site with: flwr supernode unregister NODE_ID SUPERLINK   (list them with: flwr supernode ls SUPERLINK)
set -euo pipefail

usage() {
  cat <<'EOF'
usage: register_supernodes.sh SUPERLINK KEYS [SITE ...]

  SUPERLINK  name of the connection in $FLWR_HOME/config.toml ([superlink.SUPERLINK])
  KEYS       a make_certs.sh folder (its supernodes/SITE/auth_key.pub are used), or one public key file
  SITE       register only these sites of the folder (default: every site in KEYS/supernodes)
EOF
}

if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
SUPERLINK=$1; KEYS=$2; shift 2
command -v flwr >/dev/null || { echo "register_supernodes.sh: flwr not found; activate the project's environment" >&2; exit 2; }

declare -a NAMES PUBS
if [[ -f $KEYS ]]; then
  NAMES=("$(basename "$KEYS" .pub)"); PUBS=("$KEYS")
else
  sites=("$@")
  if [[ ${#sites[@]} -eq 0 ]]; then
    for d in "$KEYS"/supernodes/*/; do [[ -d $d ]] && sites+=("$(basename "$d")"); done
  fi
  [[ ${#sites[@]} -gt 0 ]] || { echo "register_supernodes.sh: no sites under $KEYS/supernodes" >&2; exit 2; }
  for s in "${sites[@]}"; do NAMES+=("$s"); PUBS+=("$KEYS/supernodes/$s/auth_key.pub"); done
fi

status=0
for i in "${!PUBS[@]}"; do
  name=${NAMES[$i]}; pub=${PUBS[$i]}
  if [[ ! -f $pub ]]; then echo "  $name: $pub is missing" >&2; status=1; continue; fi
  out=$(flwr supernode register "$pub" "$SUPERLINK" --name "$name" --format json 2>&1) || true
  if [[ $out =~ \"node-id\":\ *([0-9]+) ]]; then
    echo "  $name: registered as node ${BASH_REMATCH[1]}"
  elif [[ $out == *"already in use"* ]]; then
    echo "  $name: already registered"
  else
    echo "  $name: registration failed:" >&2; echo "$out" >&2; status=1
  fi
done
exit $status
