#!/usr/bin/env bash
# Creates the virtualenv the Python client tests run in (target/pyenv) and
# installs the pinned official `openai` package into it. Idempotent: a venv
# that already has the pinned version is left alone.
#
#   tests/python/setup.sh            # then: cargo test -p rollout-server --test python_client
#
# The Rust test `rollout-server/tests/python_client.rs` finds the venv at
# $TANDEM_PYENV or <repo>/target/pyenv.
set -euo pipefail
cd "$(dirname "$0")/../.."

OPENAI_VERSION="3.51.0"
VENV="${TANDEM_PYENV:-target/pyenv}"
PYTHON="${PYTHON:-python3}"

have_pinned() {
  [ -x "$VENV/bin/python" ] &&
    "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null
}

if have_pinned; then
  echo "tests/python/setup.sh: $VENV already has openai==$OPENAI_VERSION"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
have_pinned
echo "tests/python/setup.sh: installed openai==$OPENAI_VERSION into $VENV"
