#!/usr/bin/env bash
# Headless Chromium and its WebDriver from Debian, for the browser tests (tests/test_report_view_browser.py).
# Installed only when missing; needs root (apt-get), as on the developers' and CI's machines.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
CALLER=browser.sh "$(dirname "$0")/apt-install.sh" "the browser tests" chromium chromium-driver
