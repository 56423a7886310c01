#!/usr/bin/env bash
# Debian packages the benchmark runs: nginx (the origin and the reference proxy), wrk (the
# load generator), taskset (util-linux, for CPU pinning) and valgrind (callgrind counts
# instructions per request). Installs only what is missing,
# so a machine that has them pays nothing. The benchmark starts its own NGINX processes with
# generated configs: a system nginx service the package may have started is stopped again.
set -euo pipefail

# nginx lives in /usr/sbin, which is not on every user's PATH.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

declare -A need=(
  [nginx]=nginx
  [wrk]=wrk
  [taskset]=util-linux
  [valgrind]=valgrind
)
missing=()
for cmd in "${!need[@]}"; do
  have "$cmd" || missing+=("${need[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's nginx package starts a server on :80 at install where it can; ours are our own.
if command -v systemctl >/dev/null 2>&1; then
  $sudo systemctl stop nginx 2>/dev/null || true
  $sudo systemctl disable nginx 2>/dev/null || true
fi
if [ -f /run/nginx.pid ]; then
  $sudo kill "$(cat /run/nginx.pid)" 2>/dev/null || true
fi
