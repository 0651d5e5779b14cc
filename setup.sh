#!/usr/bin/env bash
# Installs what the app and the tests need on a fresh Debian/Ubuntu machine (or any machine
# with Python 3.11+ and pip; the Debian packages are only for the browser and PDF tests).
set -euo pipefail
cd "$(dirname "$0")"
# Debian 12 / Ubuntu 23.04+ refuse pip installs into the system Python (PEP 668): say how to get
# a Python pip may install into, rather than fail on pip's long message.
if python3 -c 'import sys, sysconfig, pathlib; sys.exit(sys.prefix == sys.base_prefix and pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists())'; then
  :
else
  echo "setup.sh: this python3 ($(command -v python3)) is managed by the system and refuses pip installs." >&2
  echo "Create and activate a virtual environment first, then rerun the same command:" >&2
  echo "  python3 -m venv .venv && . .venv/bin/activate     (Debian/Ubuntu: apt install python3-venv if that fails)" >&2
  exit 1
fi
python3 -m pip install -q -r requirements.txt
# The browser and PDF tests skip without these tools, so failing to install them is not fatal.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  need=""
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need="$need chromium"
  command -v pdftotext >/dev/null || need="$need poppler-utils"
  if [ -n "$need" ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null; } ||
      echo "setup.sh: could not apt-install$need: the browser and PDF tests will skip" >&2
  fi
else
  echo "setup.sh: not root or no apt-get: Chromium and poppler not installed (the browser and PDF tests skip without them)" >&2
fi
