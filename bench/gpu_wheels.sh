#!/usr/bin/env bash
# The Python packages bench/gpu_check.py needs that the GPU machine lacks, as wheels in .whl/ (run here, with network):
# deepspeed's sdist builds a pure-Python wheel; pydantic-core is binary, fetched for the GPU machine's Python (3.12).
# Then, on the GPU machine, in this repository's root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out bench/results/gpu/H200
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${GPU_PYTHON:-3.12}
rm -rf .whl && mkdir .whl
pin() { "$PY" -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"; }
# the versions this checkout runs with, so that pydantic and its binary core match
"$PY" -m pip wheel -q --no-deps "$(pin deepspeed)" "$(pin hjson)" -w .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin typing_extensions)"
ls -la .whl
