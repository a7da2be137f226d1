#!/usr/bin/env bash
# CI step (issue 13, item 2): build a wheel the way `pip install .` does (not editable), install it into a fresh
# virtualenv, and purify a tiny model with it from outside the repository, so that the installed package, not the
# source tree, is what gets imported. Needs torch installed (the virtualenv reuses it: --system-site-packages).
#
#   bash .ci/wheel_smoke.sh            # the wheel with the C++ CPU extension (what a user gets)
#   FASTPURIFY_SKIP_EXT=1 bash .ci/wheel_smoke.sh    # pure-Python wheel (seconds instead of minutes)
#
# Measured on the 2-core CI machine: the wheel with the extension builds in 438 s of wall time with other work
# running beside it (4 min 42 s of CPU; the editable install's objects cannot be reused, the wheel is built from a
# clean copy of the tree); the whole step took 496 s, against 31 s without the extension. .ci/run still builds
# the extension: a pure-Python wheel would not check that a wheel carries fastpurify._C and that it loads.
# KEEP=1 keeps the temporary folder.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastpurify-wheel.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

# A clean copy of what a clone holds (tracked files plus untracked, non-ignored ones): a build/ folder or an
# in-place extension left by an earlier build would otherwise end up in the wheel.
mkdir "$work/src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
        [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$work/src"
else
    tar -C "$repo" --exclude=./build --exclude=./dist --exclude='*.so' --exclude=__pycache__ -cf - . \
        | tar -xf - -C "$work/src"
fi

python3 -m pip wheel --no-build-isolation --no-deps -q "$work/src" -w "$work/wheel"
wheel=$(ls "$work"/wheel/fastpurify-*.whl)
echo "wheel_smoke: built $(basename "$wheel") in $(( $(date +%s) - start )) s"

python3 -m venv --system-site-packages "$work/venv"
# --ignore-installed: an editable fastpurify of the same version in the system site-packages must not satisfy it
"$work/venv/bin/python" -m pip install -q --no-deps --ignore-installed "$wheel"

# From a folder outside the repository: the current directory is on sys.path and must not hold the sources.
mkdir "$work/run"
cd "$work/run"
"$work/venv/bin/fastpurify" --help > /dev/null   # the console script the wheel installs
FASTPURIFY_SKIP_EXT="${FASTPURIFY_SKIP_EXT:-0}" VENV="$work/venv" "$work/venv/bin/python" - <<'EOF'
import importlib
import os
import sys
from pathlib import Path

# An editable install of fastpurify in the system site-packages (CI makes one before this step) adds an import
# finder that maps fastpurify.* to the source tree: it would serve fastpurify._C from there to the wheel's package.
# A user of the wheel has no such finder.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in type(f).__module__]

import torch  # noqa: E402

import fastpurify  # noqa: E402
from fastpurify import backend  # noqa: E402
from fastpurify.data import synthetic_dataset  # noqa: E402
from fastpurify.models import SmallVGG  # noqa: E402

venv = Path(os.environ["VENV"]).resolve()
where = Path(fastpurify.__file__).resolve()
assert venv in where.parents, f"fastpurify was imported from {where}, not from the wheel installed in {venv}"
want_ext = os.environ["FASTPURIFY_SKIP_EXT"] != "1"
ext = backend.info()["extension"]
assert ext["built"] is want_ext, f"extension loaded: {ext['built']} ({ext['error']}), expected {want_ext}"
if want_ext:
    so = Path(importlib.import_module("fastpurify._C").__file__).resolve()
    assert venv in so.parents, f"fastpurify._C was loaded from {so}, not from the wheel"

torch.manual_seed(0)
x, y = synthetic_dataset(n=256, seed=0)
result = fastpurify.ibau(SmallVGG(), (x, y), epochs=1, batch_size=128, progress=False)
assert result.status == "completed", result.status
assert len(result.history) == 1 and all(torch.isfinite(p).all() for p in result.model.parameters())
print(f"wheel_smoke: fastpurify {fastpurify.__version__} from {where.parent}, extension "
      f"{'built' if want_ext else 'skipped'}: ibau 1 round on 256 images -> {result.status}, "
      f"{result.timings['defense']:.1f} s")
EOF
echo "wheel_smoke: passed in $(( $(date +%s) - start )) s"
