#!/bin/sh
# Record docs/progress-session.txt: dirge pull + session create + boot, through a pipe (plain lines)
# and on a terminal (util-linux script(1); the rich display's frames, escape codes stripped), against a
# loopback registry. The same runs are tests/test_progress.py's, which assert the plain lines.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
out="$here/docs/progress-session.txt"
py=${PYTHON:-python3}
{
    echo "# dirge progress, recorded by bench/record_progress.sh ($(date -u +%Y-%m-%d)); images from"
    echo "# tests/test_progress.py (a 3-layer image in a loopback docker-registry, the demo image for boot)."
    echo
} > "$out"
cd "$here"
DIRGE_RECORD_PROGRESS="$out" PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" \
    "$py" -m pytest -q -p no:cacheprovider tests/test_progress.py \
    -k "pipe or terminal_the_rich or boot_reports"
echo "wrote $out"
