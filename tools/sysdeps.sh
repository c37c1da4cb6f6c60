#!/usr/bin/env bash
# Installs the system packages the test suite drives (real clients and servers), only where
# missing. Runs as root in CI; elsewhere it uses sudo if it has to install anything.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have openssl          || need+=(openssl)
have certtool         || need+=(gnutls-bin)
have softhsm2-util    || need+=(softhsm2)
have pkcs11-tool      || need+=(opensc)
ls /usr/lib/*/pkcs11-spy.so >/dev/null 2>&1 || need+=(opensc-pkcs11)  # counts C_Login in tests
have wrk              || need+=(wrk)
have strace           || need+=(strace)  # sees SQLite sync its WAL on every commit
have nginx            || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then
    echo "sysdeps: all present"
    exit 0
fi
echo "sysdeps: installing ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "sysdeps: done"
