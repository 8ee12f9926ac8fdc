#!/usr/bin/env bash
# Debian's redis-server, the Celery broker of tests/test_celery_workers.py (the test starts and
# stops its own server on 127.0.0.1 and a free port). Installed only when missing; needs root
# (apt-get), as on the developers' and CI's machines. Prints the server's path.
set -euo pipefail
if [ ! -x /usr/bin/redis-server ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "scripts/redis.sh: redis-server is missing; install it as root: apt-get install -y redis-server" >&2
    exit 2
  fi
  echo "==> installing redis-server (Debian) for the Celery test" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # The server only. Where systemd runs, Debian's package also enables a system service on 6379;
  # the test never uses it: it starts its own server.
  apt-get install -y -qq --no-install-recommends redis-server >&2
fi
echo /usr/bin/redis-server
