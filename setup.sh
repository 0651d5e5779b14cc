#!/usr/bin/env bash
# Installs what the app and the tests need on a fresh Debian/Ubuntu machine (or any machine
# with Python 3.11+ and pip; the Debian packages are only for the browser and PDF tests).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  need=""
  command -v chromium >/dev/null || need="$need chromium"
  command -v pdftotext >/dev/null || need="$need poppler-utils"
  if [ -n "$need" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  fi
fi
