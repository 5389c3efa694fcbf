#!/usr/bin/env bash
# The README's test command: create or reuse .venv, install the project with its test
# extras, run the whole suite. Extra arguments go to pytest (e.g. -k envelope, -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" test
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
