#!/usr/bin/env bash
# Render a d2v-export report.html (or matrix.html) to a PNG in a real headless browser.
#
#   scripts/render_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
#
# Needs Debian's chromium (apt-get install -y chromium) or CHROMIUM=/path/to/chrome.
# Networking is off as far as chromium allows: the page must not need it (it is self-contained).
# Exit codes: 0 rendered, 2 usage, 3 no chromium, 4 chromium failed or wrote no PNG.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
html=$1
out=$2
size=${3:-1280,2000}
if [[ ! -f $html ]]; then
    echo "error: $html does not exist" >&2
    exit 2
fi

browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
    for candidate in chromium chromium-browser google-chrome-stable google-chrome; do
        if command -v "$candidate" >/dev/null 2>&1; then
            browser=$(command -v "$candidate")
            break
        fi
    done
fi
if [[ -z $browser ]]; then
    echo "error: no chromium found; apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)" >&2
    exit 3
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
abs_html=$(cd "$(dirname "$html")" && pwd)/$(basename "$html")
case $out in /*) abs_out=$out ;; *) abs_out=$(pwd)/$out ;; esac
rm -f "$abs_out"

# --virtual-time-budget lets layout finish before the screenshot; nothing on the page loads anything.
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --disable-default-apps \
    --disable-extensions --hide-scrollbars --mute-audio --no-default-browser-check \
    --user-data-dir="$profile" --window-size="$size" --virtual-time-budget=2000 \
    --screenshot="$abs_out" "file://$abs_html" >"$profile/log" 2>&1 || {
    echo "error: chromium failed:" >&2
    tail -20 "$profile/log" >&2
    exit 4
}
if [[ ! -s $abs_out ]]; then
    echo "error: chromium wrote no screenshot:" >&2
    tail -20 "$profile/log" >&2
    exit 4
fi
echo "$abs_out"
