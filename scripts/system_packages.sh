#!/usr/bin/env bash
# The Debian packages the local stack needs: nginx (the gateway on port 80), prometheus and
# the nginx exporter; with --tests also chromium (the browser tests). Missing ones are
# installed with apt when this runs as root; otherwise it prints the one command to run and
# exits 3. Packages never start their own services here (policy-rc.d): the stack runs its own.
#   scripts/system_packages.sh [--tests]
set -euo pipefail
nginx_sbin=${NGINX_SBIN:-/usr/sbin/nginx}          # (tests point these elsewhere)
policy=${POLICY_RC_D:-/usr/sbin/policy-rc.d}
want="nginx prometheus prometheus-nginx-exporter"
[ "${1:-}" = --tests ] && want="chromium $want"
installed() {
  case "$1" in
    nginx) command -v nginx >/dev/null || [ -x "$nginx_sbin" ] ;;
    prometheus-nginx-exporter) command -v prometheus-nginx-exporter >/dev/null || command -v nginx-prometheus-exporter >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}
missing=""
for package in $want; do installed "$package" || missing="$missing $package"; done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "[stack] missing system packages:$missing" >&2
  echo "[stack] install them, then run this again:  sudo apt-get install -y --no-install-recommends$missing" >&2
  echo "[stack] (or run as root, where make demo installs them itself; or start Docker and use Compose)" >&2
  exit 3
fi
echo "[stack] installing system packages:$missing (apt-get, about a minute)"
export DEBIAN_FRONTEND=noninteractive
policy_made=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && policy_made=1
fi
trap '[ -z "$policy_made" ] || rm -f "$policy"' EXIT
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
echo "[stack] installed:$missing"
