#!/usr/bin/env bash
# Install the suite into a fresh virtual environment, then run one smoke point (tiny LLaVA-OneVision, vanilla, the
# five smoke tasks) from an empty folder outside the checkout, so only what the install carries is used.
#
#   scripts/check_install.sh wheel paper     # build the wheel, install it under constraints/paper.txt (CI runs this)
#   scripts/check_install.sh wheel current   # the same under constraints/current.txt
#   scripts/check_install.sh fresh           # `pip install .` with no constraints at all: what a plain install
#                                            # gets from PyPI today. Not in CI; the early warning for the next
#                                            # upstream release that breaks us (then bound it in pyproject.toml).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mode="${1:?usage: check_install.sh wheel STACK | fresh}"
python="${PYTHON:-python3}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

"$python" -m venv "$scratch/venv"
pip="$scratch/venv/bin/pip"
case "$mode" in
  wheel)
    stack="${2:?usage: check_install.sh wheel paper|current}"
    "$pip" wheel -q --no-deps -w "$scratch/dist" "$root"
    echo "=== wheel $(basename "$scratch"/dist/*.whl), installed under constraints/$stack.txt"
    "$pip" install -q -c "$root/constraints/$stack.txt" "$scratch"/dist/*.whl
    ;;
  fresh)
    echo "=== pip install $root with no constraints"
    "$pip" install -q "$root"
    "$pip" freeze > "$scratch/freeze.txt"
    echo "resolved: $(grep -ciE '==' "$scratch/freeze.txt") packages;" \
      "$(grep -iE '^(transformers|lmms[-_]eval|torch|filelock)==' "$scratch/freeze.txt" | tr '\n' ' ')"
    ;;
  *) echo "unknown mode $mode: give wheel STACK or fresh" >&2; exit 2 ;;
esac

mkdir "$scratch/outside"
cd "$scratch/outside"
# The package must come from the new environment, not from a checkout on the path.
"$scratch/venv/bin/python" - <<'EOF'
import sys
import lmms_eval_models
if not lmms_eval_models.__file__.startswith(sys.prefix):
    sys.exit(f"lmms_eval_models imported from {lmms_eval_models.__file__}, not from the new environment {sys.prefix}")
from flashvid_core.accel import cpu_kernel
if not cpu_kernel.SOURCE.is_file():  # package data: the CPU product kernel's C source
    sys.exit(f"{cpu_kernel.SOURCE} is missing from the install")
EOF
"$scratch/venv/bin/flashvid-sweep" run smoke --only 'flashvid_llava_onevision.vanilla-*' | tee "$scratch/run.log"
grep -q "1 finished now" "$scratch/run.log"
grep -q "^plot: " "$scratch/run.log"
test -f results/smoke/smoke.md
echo "=== $mode install: the smoke point ran from $scratch/outside and printed its table"
