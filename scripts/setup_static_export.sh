#!/usr/bin/env bash
# Static (PNG) export of plotly figures needs a Chrome/Chromium for kaleido. Install Debian's
# chromium when we can (root + apt-get); otherwise say plainly that figures will be HTML-only.
set -u
for candidate in chromium chromium-browser google-chrome chrome; do
  if command -v "$candidate" >/dev/null 2>&1; then
    echo "==> static figure export: using $(command -v "$candidate")"
    exit 0
  fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing Debian's chromium for static (PNG) figure export"
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/tmp/mi-chromium-install.log 2>&1; then
    echo "==> static figure export: using $(command -v chromium)"
    exit 0
  fi
  echo "!! could not install chromium (see /tmp/mi-chromium-install.log)."
fi
echo "!! No Chrome/Chromium found: figures will be saved as interactive HTML only, without PNG."
echo "   Install one (e.g. 'sudo apt-get install chromium') or set BROWSER_PATH, then re-run."
exit 0
