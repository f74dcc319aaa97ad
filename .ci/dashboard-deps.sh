#!/usr/bin/env bash
# System packages for the dashboard's browser tests (tests/test_dashboard_browser.py):
# headless Chromium and the matching chromedriver from Debian, so Selenium never downloads a
# driver. Idempotent: does nothing when both are already installed. Run as root (CI image) or
# with sudo available. The Python side (selenium, schemathesis) comes from the "test" extra.
set -euo pipefail

packages=(chromium chromium-driver)
missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "dashboard-deps: ${packages[*]} already installed"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
  fi
  echo "dashboard-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

for exe in /usr/bin/chromium /usr/bin/chromedriver; do
  if [ ! -x "$exe" ]; then
    echo "dashboard-deps: $exe missing after install" >&2
    exit 1
  fi
done
/usr/bin/chromedriver --version
