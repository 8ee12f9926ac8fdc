#!/usr/bin/env bash
# Install Debian packages a test needs, once: `scripts/apt-install.sh "<what for>" <package>...`.
# Called by postgres.sh, redis.sh and browser.sh when their binaries are missing. Needs root
# (apt-get), as on the developers' and CI's machines; otherwise one line says what to install.
set -euo pipefail
what=$1
shift
if [ "$(id -u)" != 0 ]; then
  echo "$(basename "${CALLER:-$0}"): $* missing; install as root: apt-get install -y $*" >&2
  exit 2
fi
echo "==> installing $* (Debian) for $what" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
# The programs only, without Debian's recommended extras (APT_RECOMMENDS=1 keeps them: PostgreSQL
# is installed as its package is by default). Where systemd runs, redis-server's package also
# enables a system service on 6379; no test uses it.
recommends=--no-install-recommends
[ "${APT_RECOMMENDS:-0}" = 1 ] && recommends=
apt-get install -y -qq $recommends "$@" >&2
