#!/usr/bin/env bash
# The README's run command: create or reuse .venv, install the relay, then
#   scripts/run.sh                 run the demo: the relay end to end against a local
#                                  Discord stand-in (no webhook needed)
#   scripts/run.sh ARGS...         python -m notifier ARGS... (e.g. --port 5562 for the
#                                  relay itself, or status, send, check, standin)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh" ""  # an explicit "": not our own arguments
cd "$root"
if [ "$#" -eq 0 ]; then
    exec "$venv/bin/python" -m notifier demo
fi
exec "$venv/bin/python" -m notifier "$@"
