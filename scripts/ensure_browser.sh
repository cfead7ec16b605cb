#!/usr/bin/env bash
# A Chrome/Chromium for kaleido's static figure export (PNG/PDF/SVG), called by `make setup`.
#   scripts/ensure_browser.sh PYTHON
# Looks for one with aimm's own search (aimm.plots.find_browser: $BROWSER_PATH, PATH, the usual
# install paths). None found: installs Debian's `chromium` with apt-get when running as root or
# when `sudo -n` works; otherwise (or when the install fails, or AIMM_SKIP_BROWSER=1) it prints
# one line saying what to install and exits 0: everything else works, figures are HTML only.
set -u
PY="${1:-python3}"
MISSING="aimm setup: no Chrome/Chromium found, so figures will be exported as HTML only (PNG/PDF/SVG skipped); for static figures install one (Debian/Ubuntu: sudo apt-get install chromium) or set BROWSER_PATH to a Chrome/Chromium executable"

found() { "$PY" -c "from aimm.plots.output import find_browser; print(find_browser())" 2>/dev/null; }

if path="$(found)"; then
  echo "aimm setup: browser for static figures: $path"
  exit 0
fi
if [ "${AIMM_SKIP_BROWSER:-0}" = "1" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "$MISSING"
  exit 0
fi
if [ "$(id -u)" = "0" ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
  SUDO="sudo -n"
else
  echo "$MISSING"
  exit 0
fi
echo "aimm setup: no Chrome/Chromium found; installing Debian's chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null && path="$(found)"; then
  echo "aimm setup: browser for static figures: $path"
else
  echo "$MISSING"
fi
exit 0
