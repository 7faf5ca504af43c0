#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need
# that cargo does not (the Python `openai` client in a virtualenv), then runs
# every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x tests/python/setup.sh ]; then
  tests/python/setup.sh
fi
cargo test --workspace "$@"
