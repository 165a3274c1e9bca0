# Sourced by the setup scripts: `quiet_pip PYTHON ARGS...` runs `PYTHON -m pip ARGS...`
# with its output on stderr, less the warning pip prints for each package about
# find-links folders its configuration names and this machine lacks (hundreds of
# lines that would bury a real error in CI's log). Fails when pip fails.
quiet_pip() {
  local python="$1"
  shift
  "$python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
}
