#!/usr/bin/env bash
# Ahead-of-time compile of every Triton kernel variant (tests/test_aot_compile.py) under triton 3.7.1, the version
# torch 2.13.0's CUDA wheel pins (what a GPU user gets); the main suite runs the same test under the newest triton
# the [triton] extra installs. A virtualenv with --system-site-packages reuses the installed torch, pytest and
# fastpurify (editable) and only adds its own triton; it is kept between runs (AOT_VENV) and re-made when its
# triton is not the pinned one. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
TRITON_PIN=${TRITON_PIN:-3.7.1}
VENV=${AOT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastpurify/aot-triton-$TRITON_PIN}
start=$(date +%s)

if ! "$VENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$TRITON_PIN')" 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q "triton==$TRITON_PIN"
fi
"$VENV/bin/python" -c "import triton, fastpurify; print('triton', triton.__version__, 'from', triton.__file__)"
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest tests/test_aot_compile.py -q -rfEs "$@"
echo "AOT compile under triton $TRITON_PIN finished in $(( $(date +%s) - start )) s"
