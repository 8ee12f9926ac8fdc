#!/usr/bin/env bash
# Debian's redis-server, the Celery broker of tests/test_celery_workers.py (the test starts and
# stops its own server on 127.0.0.1 and a free port). Installed only when missing; needs root
# (apt-get), as on the developers' and CI's machines. Prints the server's path.
set -euo pipefail
if [ ! -x /usr/bin/redis-server ]; then
  CALLER=redis.sh "$(dirname "$0")/apt-install.sh" "the Celery test" redis-server
fi
echo /usr/bin/redis-server
