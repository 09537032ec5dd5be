#!/bin/bash
# HA pair benchmarks (issue 5): mirrored vs unmirrored 4 KiB random writes,
# and partner reads (live replay vs forwarded vs owner). See bench/README.md
# and the docstring of bench/pair_bench.py for what is run and the knobs.
#
# Usage: bench/pair-bench.sh [mirror] [reads]     (both when none is named)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec python3 "$HERE/pair_bench.py" "$@"
