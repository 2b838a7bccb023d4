#!/usr/bin/env bash
# fedtextseg deployment: make the TLS certificates and the SuperNode authentication keys of one federation.
#
# What it writes (OUT_DIR, created with mode 700):
#   OUT_DIR/ca.crt                      test CA certificate: give it to every site and to the operator's `flwr` CLI
#   OUT_DIR/ca.key                      test CA private key: keep it on the server admin's machine, never copy it
#   OUT_DIR/server.crt, server.key      the SuperLink's TLS certificate and key (SAN: localhost, 127.0.0.1 and
#                                       every --server-name / --server-ip given); they stay on the server
#   OUT_DIR/supernodes/SITE/auth_key     SITE's SuperNode authentication private key (EC P-384, OpenSSH format):
#                                       copy it to that site only
#   OUT_DIR/supernodes/SITE/auth_key.pub its public key: registered on the SuperLink with `flwr supernode register`
#
# Running it again adds sites: the CA, the SuperLink certificate (unless --renew-server) and existing site keys
# are kept, never overwritten. The CA made here is a private test CA; a hospital may use its own PKI instead (any CA whose
# certificate the sites trust, with a server certificate whose SAN names the SuperLink's host name).
#
# Needs: openssl; ssh-keygen (or, without it, python3 with the `cryptography` package, which Flower installs).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: make_certs.sh OUT_DIR [--server-name NAME]... [--server-ip IP]... [--days N] [--renew-server] [SITE ...]

  OUT_DIR             where the CA, the SuperLink certificate and the SuperNode keys go (see the header)
  --server-name NAME  a DNS name the SuperNodes and the operator use to reach the SuperLink (repeatable);
                      localhost is always included
  --server-ip IP      an IP address of the SuperLink (repeatable); 127.0.0.1 is always included
  --days N            validity of the certificates in days (default 825)
  --renew-server      remake the SuperLink certificate even if OUT_DIR has one (e.g. to change its names)
  SITE                one SuperNode key pair per site name (letters, digits, '.', '_', '-')

example: scripts/deploy/make_certs.sh ~/fedtextseg-certs --server-name fl.hospital-net.org hospital-a hospital-b
EOF
}

if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
if [[ $1 == -h || $1 == --help ]]; then usage; exit 0; fi
OUT=$1; shift
NAMES=(localhost); IPS=(127.0.0.1); DAYS=825; SITES=(); RENEW=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --server-name) NAMES+=("${2:?--server-name needs a value}"); shift 2 ;;
    --server-ip) IPS+=("${2:?--server-ip needs a value}"); shift 2 ;;
    --days) DAYS=${2:?--days needs a value}; shift 2 ;;
    --renew-server) RENEW=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "make_certs.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) SITES+=("$1"); shift ;;
  esac
done

command -v openssl >/dev/null || { echo "make_certs.sh: openssl is not installed" >&2; exit 3; }
for site in "${SITES[@]+"${SITES[@]}"}"; do
  [[ $site =~ ^[A-Za-z0-9._-]+$ ]] || { echo "make_certs.sh: bad site name '$site'" >&2; exit 2; }
done

umask 077
mkdir -p "$OUT/supernodes"
chmod 700 "$OUT"
cd "$OUT"

# ------------------------------------------------------------------ test CA
if [[ ! -f ca.key || ! -f ca.crt ]]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out ca.key
  openssl req -x509 -new -key ca.key -sha384 -days "$DAYS" -out ca.crt \
    -subj "/O=fedtextseg federation/CN=fedtextseg test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  echo "made the CA:            $PWD/ca.crt"
else
  echo "reusing the CA:         $PWD/ca.crt"
fi

# ------------------------------------------------------------------ SuperLink server certificate
if [[ -f server.key && -f server.crt && $RENEW == 0 ]]; then
  echo "keeping the SuperLink cert: $PWD/server.crt (--renew-server remakes it)"
else
  san=""
  for n in "${NAMES[@]}"; do san+="${san:+,}DNS:$n"; done
  for ip in "${IPS[@]}"; do san+=",IP:$ip"; done
  cat > server.cnf <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
O = fedtextseg federation
CN = ${NAMES[-1]}
[ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
EOF
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out server.key
  openssl req -new -key server.key -out server.csr -config server.cnf
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days "$DAYS" \
    -sha384 -extfile server.cnf -extensions ext 2>/dev/null
  rm -f server.csr server.cnf
  openssl verify -CAfile ca.crt server.crt >/dev/null
  chmod 644 ca.crt server.crt
  echo "made the SuperLink cert: $PWD/server.crt ($san)"
fi

# ------------------------------------------------------------------ SuperNode authentication keys (EC P-384)
make_key() {  # make_key PRIVATE_KEY_PATH COMMENT -> PRIVATE_KEY_PATH (OpenSSH) + PRIVATE_KEY_PATH.pub
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$2" -f "$1"
  else
    python3 - "$1" "$2" <<'PY'
import os, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
path, comment = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption()))
pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
with open(path + ".pub", "wb") as f:
    f.write(pub + b" " + comment.encode() + b"\n")
PY
  fi
}
for site in "${SITES[@]+"${SITES[@]}"}"; do
  mkdir -p "supernodes/$site"
  if [[ -f supernodes/$site/auth_key ]]; then
    echo "keeping the key of $site: $PWD/supernodes/$site/auth_key.pub"
    continue
  fi
  make_key "supernodes/$site/auth_key" "fedtextseg-supernode-$site"
  chmod 600 "supernodes/$site/auth_key"; chmod 644 "supernodes/$site/auth_key.pub"
  echo "made the key of $site:  $PWD/supernodes/$site/auth_key(.pub)"
done
