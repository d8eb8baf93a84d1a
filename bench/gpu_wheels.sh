#!/usr/bin/env bash
# The Python packages bench/gpu_check.py needs that the lent GPU machine lacks, as wheels in .whl/ (run here, where
# PyPI is reachable): deepspeed (its sdist builds a pure-Python wheel) and hjson, and pydantic with its binary core
# (fetched for the GPU machine's Python, 3.12 unless GPU_PYTHON says otherwise) with typing_extensions, at the
# versions this checkout runs.
# The GPU machine already has torch, transformers, numpy, msgpack, psutil, py-cpuinfo, einops, ninja and the rest.
#
# .whl/ is ignored by git, so it travels to the GPU machine only when the device call names it in `carry`; the exact
# call (command, carry, time limit) is in docs/status.md, "The GPU check". There, in the repository's root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT" --budget 300
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
PYVER=${GPU_PYTHON:-3.12}
if ! "$PY" -c "import deepspeed, pydantic" 2>/dev/null; then
    echo "gpu_wheels.sh: $PY cannot import deepspeed and pydantic, whose versions the wheels copy." >&2
    echo "Install the project first (the README's test command makes .venv), or set PY to a Python that has them." >&2
    exit 2
fi
rm -rf .whl && mkdir .whl
pin() { "$PY" -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"; }
"$PY" -m pip wheel -q --no-deps "$(pin deepspeed)" "$(pin hjson)" -w .whl
# pydantic-core is compiled: the wheel for the GPU machine's Python and platform, whatever this machine runs
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin typing_extensions)"
ls -la .whl
echo "carry .whl with the device call (docs/status.md, 'The GPU check')"
