# Sourced by the scripts: makes .venv (Python 3.11+) with llm-traj and its dev
# dependencies installed, reinstalling whenever pyproject.toml changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.llm-traj-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "llm-traj needs Python 3.11 or newer ($python is older); set PYTHON=/path/to/python3.11" >&2; exit 1; }
  echo "setting up $venv (once)..." >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[dev]" >&2
  "$venv/bin/python" -m pip check >&2
  echo "$want" > "$stamp"
fi
