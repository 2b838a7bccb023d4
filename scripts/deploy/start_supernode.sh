#!/usr/bin/env bash
# fedtextseg deployment: start one hospital's Flower SuperNode, pointing at that hospital's site folder.
# It runs in the foreground (run it under systemd, tmux or nohup); Ctrl-C / SIGTERM stops it.
#
# The SuperNode only opens an outgoing HTTPS connection to the SuperLink (verified with the federation's CA
# certificate) and signs every request with the site's private key, which must have been registered on the
# SuperLink (`flwr supernode register`, see register_supernodes.sh); an unregistered key is refused and the
# SuperNode exits. The site's images and labels never leave this machine: the ClientApp reads SITE_PATH (given to
# it as the node config `site-path`) and sends back model arrays and metrics only. The frozen pretrained parts
# arrive once from the server and are cached, with the preprocessed data, under the cache folder.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: start_supernode.sh SITE_NAME SITE_PATH --superlink HOST:PORT [--certs DIR] [--ca FILE] [--key FILE]
                          [--port PORT] [--cache-dir DIR] [-- FLOWER_SUPERNODE_ARGS...]

  SITE_NAME            the site's name (picks its key in a make_certs.sh folder)
  SITE_PATH            the site folder (site.yaml and/or MSD dataset.json; check it with `fedtextseg check-site`)
  --superlink H:P      the SuperLink's address as its certificate names it (default: $FEDTEXTSEG_SUPERLINK)
  --certs DIR          folder with ca.crt and the site's key (DIR/supernodes/SITE_NAME/auth_key or DIR/auth_key)
  --ca FILE            the federation's CA certificate (default: DIR/ca.crt)
  --key FILE           the site's SuperNode private key (default: found in DIR as above)
  --port PORT          local port of the SuperNode's own Runtime API, on 127.0.0.1 (default 9094; give each
                       SuperNode on one machine its own)
  --cache-dir DIR      frozen-bundle and preprocessing cache (sets FEDTEXTSEG_CACHE; default: the current
                       $FEDTEXTSEG_CACHE, else ~/.cache/fedtextseg)
  after --              passed to flower-supernode as they are (e.g. --max-retries 10)
EOF
}

if [[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
SITE=$1; SITE_PATH=$2; shift 2
SUPERLINK=${FEDTEXTSEG_SUPERLINK:-}; CERTS=""; CA=""; KEY=""; PORT=9094; CACHE=""; EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --superlink) SUPERLINK=${2:?--superlink needs a value}; shift 2 ;;
    --certs) CERTS=${2:?--certs needs a value}; shift 2 ;;
    --ca) CA=${2:?--ca needs a value}; shift 2 ;;
    --key) KEY=${2:?--key needs a value}; shift 2 ;;
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --cache-dir) CACHE=${2:?--cache-dir needs a value}; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start_supernode.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

die() { echo "start_supernode.sh: $*" >&2; exit 2; }
[[ -n $SUPERLINK ]] || die "no SuperLink address: pass --superlink HOST:PORT (or set FEDTEXTSEG_SUPERLINK)"
if [[ -n $CERTS ]]; then
  [[ -n $CA ]] || CA=$CERTS/ca.crt
  if [[ -z $KEY ]]; then
    if [[ -f $CERTS/supernodes/$SITE/auth_key ]]; then KEY=$CERTS/supernodes/$SITE/auth_key; else KEY=$CERTS/auth_key; fi
  fi
fi
[[ -n $CA && -f $CA ]] || die "the CA certificate '${CA:-?}' is missing (--certs DIR or --ca FILE)"
[[ -n $KEY && -f $KEY ]] || die "the SuperNode key '${KEY:-?}' is missing (--certs DIR or --key FILE)"
[[ -d $SITE_PATH ]] || die "site folder $SITE_PATH does not exist"
SITE_PATH=$(cd "$SITE_PATH" && pwd)   # the ClientApp runs elsewhere: give it an absolute path
[[ $SITE_PATH != *'"'* && $SITE_PATH != *'\'* ]] || die "the site path must not contain quotes or backslashes"
[[ -f $SITE_PATH/site.yaml || -f $SITE_PATH/dataset.json ]] \
  || die "$SITE_PATH has neither site.yaml nor dataset.json (see \`fedtextseg check-site --help\`)"
if [[ -n $CACHE ]]; then
  mkdir -p "$CACHE"
  export FEDTEXTSEG_CACHE=$(cd "$CACHE" && pwd)   # absolute: the ClientApp processes run elsewhere
fi
command -v flower-supernode >/dev/null || die "flower-supernode not found; activate the project's environment (.venv)"
# Sites are air-gapped: never try a model hub; the ClientApp runs in this environment (no dependency install).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

echo "start_supernode.sh: site $SITE ($SITE_PATH) -> SuperLink $SUPERLINK, cache ${FEDTEXTSEG_CACHE:-~/.cache/fedtextseg}" >&2
exec flower-supernode \
  --superlink "$SUPERLINK" \
  --root-certificates "$CA" \
  --auth-supernode-private-key "$KEY" \
  --node-config "site-path=\"$SITE_PATH\"" \
  --host 127.0.0.1 --port "$PORT" \
  "${EXTRA[@]+"${EXTRA[@]}"}"
