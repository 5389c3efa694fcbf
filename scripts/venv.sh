# Sourced by run.sh and test.sh: create or reuse .venv and install the project into it.
# Usage: source scripts/venv.sh EXTRAS   (EXTRAS: "" for the relay only, "test" for tests;
# always pass it: a bare `source` would hand this file the caller's own arguments)
# Reinstalls only when setup.cfg changed since the last install (an install with extras
# serves the relay too); set PYTHON to choose the interpreter that creates the environment
# (default: python3, which must be 3.11 or newer).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
    "${PYTHON:-python3}" -m venv "$venv"
fi
stamp="$venv/.installed${extras:+-$extras}"
candidates=("$stamp")
[ -z "$extras" ] && candidates=("$venv"/.installed*)  # any install serves the relay
fresh=""
for candidate in "${candidates[@]}"; do
    [ -f "$candidate" ] && [ ! "$root/setup.cfg" -nt "$candidate" ] && fresh=1
done
if [ -z "$fresh" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e "$root${extras:+[$extras]}" && touch "$stamp"
fi
