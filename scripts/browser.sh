#!/usr/bin/env bash
# Headless Chromium and its WebDriver from Debian, for the browser tests (tests/test_report_view_browser.py).
# Installed only when missing; needs root (apt-get), as on the developers' and CI's machines.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "scripts/browser.sh: chromium and chromium-driver are missing; install them as root: apt-get install -y chromium chromium-driver" >&2
  exit 2
fi
echo "==> installing chromium and chromium-driver (Debian) for the browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
