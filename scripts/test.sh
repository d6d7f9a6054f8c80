#!/usr/bin/env bash
# Set up (with test dependencies) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# The browser test (tests/test_serve_page.py) runs the canvas page in Debian's headless Chromium,
# driven by chromium-driver; install both once (the test skips without them, and fails under CI).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "test: installing chromium and chromium-driver (apt-get; once)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null 2>&1 || echo "test: could not install chromium; the browser test will not run" >&2
  else
    echo "test: no chromium/chromedriver and no apt-get as root; the browser test will not run" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
