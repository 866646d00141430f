# benches/bench_pki.sh, sourced by the benchmark scripts that use TLS on loopback:
# make_pki DIR CA_NAME makes a test CA and QEMU x509 credential directories DIR/server
# (CN localhost, serverAuth) and DIR/client (CN bench, clientAuth), both valid for localhost
# and 127.0.0.1, with the keyEncipherment usage qemu-nbd requires of a pair.

make_pki() {
    local dir=$1 ca_name=$2 role cn usage
    mkdir -p "$dir/ca" "$dir/server" "$dir/client"
    (cd "$dir/ca" && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem \
        -days 3 -subj "/CN=$ca_name" -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null)
    for role in server client; do
        cn=localhost; usage=serverAuth
        [[ $role == client ]] && { cn=bench; usage=clientAuth; }
        printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=%s\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' \
            "$usage" >"$dir/ca/$role.ext"
        openssl req -newkey rsa:2048 -nodes -keyout "$dir/$role/$role-key.pem" -out "$dir/ca/$role.csr" \
            -subj "/CN=$cn" 2>/dev/null
        openssl x509 -req -in "$dir/ca/$role.csr" -CA "$dir/ca/ca-cert.pem" -CAkey "$dir/ca/ca-key.pem" \
            -CAcreateserial -out "$dir/$role/$role-cert.pem" -days 3 -extfile "$dir/ca/$role.ext" 2>/dev/null
        cp "$dir/ca/ca-cert.pem" "$dir/$role/"
    done
}

