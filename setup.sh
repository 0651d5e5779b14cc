#!/usr/bin/env bash
# Installs what the app and the tests need on a fresh Debian/Ubuntu machine (or any machine
# with Python 3.11+ and pip; the Debian packages are only for the browser and PDF tests).
set -euo pipefail
cd "$(dirname "$0")"
# Debian 12 / Ubuntu 23.04+ refuse pip installs into the system Python (PEP 668), unless told
# otherwise (PIP_BREAK_SYSTEM_PACKAGES, pip.conf): pip decides; its refusal becomes one sentence.
if ! log=$(python3 -m pip install -q -r requirements.txt 2>&1); then
  if grep -q "externally-managed-environment" <<<"$log"; then
    echo "setup.sh: this python3 ($(command -v python3)) is managed by the system and refuses pip installs." >&2
    echo "Create and activate a virtual environment first, then rerun the same command:" >&2
    echo "  python3 -m venv .venv && . .venv/bin/activate     (Debian/Ubuntu: apt install python3-venv if that fails)" >&2
  else
    echo "$log" >&2
  fi
  exit 1
fi
[ -z "$log" ] || echo "$log" >&2
# The browser and PDF tests need these tools; without them tests/test_environment.py fails (unless
# BT_NO_BROWSER=1), so failing to install them here is a warning, not the end of the setup.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  need=""
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need="$need chromium"
  command -v pdftotext >/dev/null || need="$need poppler-utils"
  if [ -n "$need" ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null; } ||
      echo "setup.sh: could not apt-install$need: the browser and PDF tests will fail (BT_NO_BROWSER=1 skips them)" >&2
  fi
else
  echo "setup.sh: not root or no apt-get: Chromium and poppler not installed here (the browser and PDF tests need them; BT_NO_BROWSER=1 skips them)" >&2
fi
