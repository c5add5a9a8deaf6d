#!/usr/bin/env bash
# Extracts the sysfs snapshots (DATA/*.tar.bz2) into DEST, once: DEST/.stamp holds the
# archives' checksums, and a DEST whose stamp matches them is left as it is. Extraction
# goes to a scratch folder beside DEST, renamed into place when complete, under a lock, so
# concurrent callers wait and then find it done. ctest runs this once, as the
# sysfs_snapshots fixture of the tests that read snapshots.
# Usage: sysfs_snapshots.sh DATA DEST
set -euo pipefail
data=$1
dest=$2
stamp=$(cd "$data" && sha256sum -- *.tar.bz2)
parent=$(dirname "$dest")
mkdir -p "$parent"
exec 9>"$dest.lock"
flock 9
if [[ -f $dest/.stamp && $(<"$dest/.stamp") == "$stamp" ]]; then
  echo "sysfs snapshots: up to date in $dest"
  exit 0
fi
work=$(mktemp -d "$dest.new.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS
for archive in "$data"/*.tar.bz2; do
  tar xjf "$archive" -C "$work"
done
printf '%s\n' "$stamp" >"$work/.stamp"
rm -rf "$dest"
mv "$work" "$dest"
echo "sysfs snapshots: extracted into $dest in $((SECONDS - start)) s"
