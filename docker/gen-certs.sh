#!/bin/sh
# Create the demo's secrets once, for docker-compose.yml's one-shot "certs" service:
#
#   KEYS_DIR/server.crt, KEYS_DIR/server.key  the proxy's downstream TLS certificate and key
#                                             (self-signed ECDSA P-256, CA:TRUE, so a client
#                                             can also trust it with sslrootcert=server.crt)
#   KEYS_DIR/public.pem                       the Ed25519 token verification key (PUBLIC_KEYS__0)
#   ISSUER_DIR/private.pem                    the Ed25519 token signing key (only the issuer,
#                                             here the "token" service, mounts ISSUER_DIR)
#
# Usage: gen-certs.sh [KEYS_DIR [ISSUER_DIR]]   (defaults: /keys and KEYS_DIR)
#
# Idempotent: whatever already exists is kept, so tokens and client trust survive restarts.
# Files are written under a temporary name and renamed, so an interrupted run leaves no
# half-written file behind. Needs only python3 with "cryptography" and the
# jwt-postgresql-proxy console script, i.e. the proxy image itself.
#
# Environment: CERT_HOSTNAMES  comma-separated DNS names / IP addresses for the certificate
#                              (default: localhost,127.0.0.1,::1)
#              PYTHON          interpreter to use (default: python3)
set -eu

keys_dir=${1:-/keys}
issuer_dir=${2:-$keys_dir}
python=${PYTHON:-python3}
hostnames=${CERT_HOSTNAMES:-localhost,127.0.0.1,::1}

umask 077
mkdir -p "$keys_dir" "$issuer_dir"

say() { echo "gen-certs: $*" >&2; }

# --- Downstream TLS certificate and key --------------------------------------------------
if [ -s "$keys_dir/server.crt" ] && [ -s "$keys_dir/server.key" ]; then
    say "keeping $keys_dir/server.crt and $keys_dir/server.key"
else
    "$python" - "$keys_dir/server.crt" "$keys_dir/server.key" "$hostnames" <<'PY'
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

cert_path, key_path, hostnames = sys.argv[1], sys.argv[2], sys.argv[3]
names = []
for item in (part.strip() for part in hostnames.split(",")):
    if not item:
        continue
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(item)))
    except ValueError:
        names.append(x509.DNSName(item))
key = ec.generate_private_key(ec.SECP256R1())
subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwt-postgresql-proxy")])
now = datetime.datetime.now(datetime.timezone.utc)
builder = (
    x509.CertificateBuilder()
    .subject_name(subject)
    .issuer_name(subject)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(minutes=5))
    .not_valid_after(now + datetime.timedelta(days=825))
    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    .add_extension(
        x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=False, encipher_only=False, decipher_only=False,
        ),
        critical=True,
    )
    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
)
if names:
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
cert = builder.sign(key, hashes.SHA256())


def write(path, data):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return tmp


key_tmp = write(key_path, key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
))
cert_tmp = write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
os.replace(key_tmp, key_path)
os.replace(cert_tmp, cert_path)  # last: a present certificate means a complete pair
PY
    say "wrote $keys_dir/server.crt and $keys_dir/server.key (SAN: $hostnames)"
fi

# --- Token signing key pair ----------------------------------------------------------------
if [ -s "$issuer_dir/private.pem" ]; then
    say "keeping $issuer_dir/private.pem"
    if [ ! -s "$keys_dir/public.pem" ]; then
        # Public key lost (e.g. only that volume was removed): derive it again, so tokens
        # signed with the kept private key still verify.
        "$python" - "$issuer_dir/private.pem" "$keys_dir/public.pem" <<'PY'
import os
import sys

from cryptography.hazmat.primitives import serialization

private_path, public_path = sys.argv[1], sys.argv[2]
with open(private_path, "rb") as handle:
    key = serialization.load_pem_private_key(handle.read(), password=None)
data = key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
with open(public_path + ".tmp", "wb") as handle:
    handle.write(data)
os.replace(public_path + ".tmp", public_path)
PY
        say "derived $keys_dir/public.pem from $issuer_dir/private.pem"
    fi
else
    rm -f "$issuer_dir/private.pem.tmp" "$keys_dir/public.pem.tmp"
    if ! out=$(jwt-postgresql-proxy keygen --type ed25519 \
        --private-key "$issuer_dir/private.pem.tmp" --public-key "$keys_dir/public.pem.tmp" 2>&1)
    then
        say "keygen failed: $out"
        exit 1
    fi
    mv -f "$keys_dir/public.pem.tmp" "$keys_dir/public.pem"
    mv -f "$issuer_dir/private.pem.tmp" "$issuer_dir/private.pem"  # last: marks completion
    say "wrote $issuer_dir/private.pem (keep secret) and $keys_dir/public.pem"
fi
