# The harness the CLI tests share; sourced after `physr` is set (the binary under test).
# Counts passes and failures; `finish NAME` prints the totals and sets the exit status.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
passes=0
pass() { passes=$((passes + 1)); }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

# expect CODE PATTERN -- ARGS...: run physr ARGS, check the exit code and that PATTERN
# appears in stdout+stderr.
expect() {
  local code=$1 pattern=$2
  shift 3
  local out rc
  out=$("$physr" "$@" 2>&1)
  rc=$?
  if [[ $rc -ne $code ]]; then
    fail "physr $* exited $rc, expected $code"; echo "$out" | head -5; return
  fi
  if ! grep -qE -- "$pattern" <<<"$out"; then
    fail "physr $* output lacks /$pattern/"; echo "$out" | head -5; return
  fi
  pass
}

# check NAME COMMAND...: a pass if COMMAND succeeds.
check() {
  local name=$1
  shift
  if "$@"; then pass; else fail "$name"; fi
}

# finish NAME: the totals, and the script's exit status.
finish() {
  echo "$1: $passes passed, $fails failed"
  [[ $fails -eq 0 ]]
}
