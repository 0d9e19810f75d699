#!/usr/bin/env bash
# Installs what tests/web/test_web_sidebar.py needs: Chromium and Node.js from the system's
# packages (Debian/Ubuntu apt), and playwright-core (pinned in tests/web/package.json) into
# tests/web/node_modules. Without them that test is skipped, with the reason.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# playwright-core drives the system's Chromium; it downloads no browser of its own.
npm install --prefix . --no-audit --no-fund --no-package-lock --loglevel=error
node -e "console.log('playwright-core', require('playwright-core/package.json').version, 'ready')"
