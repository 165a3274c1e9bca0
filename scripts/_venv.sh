# Sourced by the scripts: makes a venv with llm-traj and its dev dependencies
# installed, reinstalling whenever pyproject.toml changes.
#   LLM_TRAJ_VENV  the venv's directory (default .venv; relative to the repo root)
#   PYTHON         the interpreter that makes it (default python3.11); pip then picks
#                  the dependency set for it: mitmproxy 11 with openai 2 / anthropic 0.x
#                  on 3.11, mitmproxy 12 with openai 3 / anthropic 2 on 3.12 and later
#   LLM_TRAJ_EXTRAS the extras installed (default dev; scripts/test-scale: scale)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/_pip.sh"
venv="${LLM_TRAJ_VENV:-.venv}"
[[ "$venv" = /* ]] || venv="$root/$venv"
stamp="$venv/.llm-traj-installed"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "llm-traj needs Python 3.11 or newer ($python is older); set PYTHON=/path/to/python3.11" >&2; exit 1; }
if [ -x "$venv/bin/python" ] && [ -n "${PYTHON:-}" ]; then
  # an existing venv keeps its interpreter: say so instead of testing another one
  [ "$("$venv/bin/python" -c 'import sys; print(sys.version_info[:2])')" = "$("$python" -c 'import sys; print(sys.version_info[:2])')" ] \
    || { echo "$venv was made with another Python than $python; remove it or set LLM_TRAJ_VENV to another directory" >&2; exit 1; }
fi
extras="${LLM_TRAJ_EXTRAS:-dev}"
want="$(cat "$root/pyproject.toml" <(echo "$extras") | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $venv (once)..." >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  quiet_pip "$venv/bin/python" install --quiet --disable-pip-version-check -e "$root[$extras]"
  quiet_pip "$venv/bin/python" check
  echo "$want" > "$stamp"
fi
