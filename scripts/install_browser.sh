#!/usr/bin/env bash
# Install the browser of the explorer's browser test (tests/explore/test_browser.py): Debian's
# Chromium and a font for the screenshot. Idempotent: does nothing when both are installed.
# Playwright drives this Chromium through executable_path; `playwright install` (which downloads
# browsers) is never used. Exit status 1, with the reason, when they cannot be installed.
set -euo pipefail
PACKAGES=(chromium fonts-dejavu-core)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ] && [ -x /usr/bin/chromium ]; then
    echo "install_browser: chromium and fonts already installed ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_browser: no apt-get here: install Chromium at /usr/bin/chromium by hand (${missing[*]})" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "install_browser: not root and no sudo: cannot install ${missing[*]}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
echo "install_browser: installing ${missing[*]}"
if ! { $SUDO apt-get -o DPkg::Lock::Timeout=900 update -q >/dev/null &&
       $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -q "${missing[@]}" >/dev/null; }; then
    echo "install_browser: apt-get could not install ${missing[*]}" >&2
    exit 1
fi
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium installed')"
