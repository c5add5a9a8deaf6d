#!/usr/bin/env bash
# Command-line behaviour of physr: exit codes (0 ok, 1 failure, 2 usage) and messages that
# name the bad input.
set -u
physr=$1
src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
passes=0

# expect CODE PATTERN -- ARGS...: run physr ARGS, check the exit code and that PATTERN
# appears in stdout+stderr.
expect() {
  local code=$1 pattern=$2
  shift 3
  local out rc
  out=$("$physr" "$@" 2>&1)
  rc=$?
  if [[ $rc -ne $code ]]; then
    echo "FAIL: physr $* exited $rc, expected $code"; echo "$out" | head -5; fails=$((fails + 1)); return
  fi
  if ! grep -qE -- "$pattern" <<<"$out"; then
    echo "FAIL: physr $* output lacks /$pattern/"; echo "$out" | head -5; fails=$((fails + 1)); return
  fi
  passes=$((passes + 1))
}

expect 0 '^physr [0-9]+\.[0-9]+\.[0-9]+' -- --version
expect 0 'ranges' -- --help
expect 0 'Range lists' --
expect 0 'max-segment' -- ranges --help
expect 0 '-> 1 ranges' -- ranges --pattern contiguous --count 1000
expect 0 '-> 16 ranges' -- ranges --pattern contiguous --count 1024 --max-segment 256K
expect 0 '-> 2 ranges' -- ranges --pattern contiguous --count 16 --boundary 32K --seed 5
expect 2 'bogus' -- ranges --pattern bogus
expect 2 'count' -- ranges --count abc
expect 2 'count' -- ranges --count 0
expect 2 "'12Q'" -- ranges --max-segment 12Q
expect 2 'max_segment' -- ranges --max-segment 100
expect 2 '3K.*power of two' -- ranges --boundary 3K
expect 2 'nosuch' -- nosuch
expect 2 'frobnicate' -- ranges --frobnicate
expect 1 "cannot read pfn file '$tmp/missing'" -- ranges --pfns "$tmp/missing"

printf '0x100\n0x101\n0x102 3\n0x103 3\n# gap\n0x200\n' > "$tmp/good.txt"
expect 0 '5 pfns .* -> 3 ranges' -- ranges --pfns "$tmp/good.txt"
printf '0x100\nbanana\n' > "$tmp/bad.txt"
expect 1 "$tmp/bad.txt:2: expected a pfn" -- ranges --pfns "$tmp/bad.txt"
printf '0x100 7 9\n' > "$tmp/bad2.txt"
expect 1 "bad2.txt:1: unexpected text '9'" -- ranges --pfns "$tmp/bad2.txt"
printf '0x40000000000\n' > "$tmp/high.txt"
expect 1 'ERANGE.*2\^42' -- ranges --pfns "$tmp/high.txt"

# JSON is one object with the counts.
out=$("$physr" ranges --pattern alternating --count 64 --json)
if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["ranges"]==64 and d["pfns"]==64 and len(d["entries"])==64' "$out" 2>/dev/null \
   || { [[ $(grep -c '"addr"' <<<"$out") -eq 64 ]] && grep -q '"ranges": 64' <<<"$out"; }; then
  passes=$((passes + 1))
else
  echo "FAIL: ranges --json"; fails=$((fails + 1))
fi

echo "cli: $passes passed, $fails failed"
[[ $fails -eq 0 ]]
