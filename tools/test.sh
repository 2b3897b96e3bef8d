#!/usr/bin/env bash
# Run the test suite (creates the cached virtualenv on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
exec python -m pytest tests -q -p no:cacheprovider --timeout 900 "$@"
