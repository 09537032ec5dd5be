#!/bin/bash
# Static checks for the bench harness: bash -n, shellcheck (if installed),
# python3 parse of the helpers. Runs nothing against a target.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rc=0
for f in "$HERE"/*.sh; do
  bash -n "$f" || { echo "bash -n failed: $f" >&2; rc=1; }
done
if command -v shellcheck >/dev/null; then
  shellcheck "$HERE"/*.sh || rc=1
else
  echo "shellcheck not installed (apt-get install -y shellcheck); skipped" >&2
fi
for p in "$HERE"/*.py; do
  python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' "$p" || rc=1
done
[ $rc = 0 ] && echo "bench harness: ok"
exit $rc
