#!/usr/bin/env bash
# One command for a GPU box: the LLM tests on CUDA, greedy parity (bf16 both sides), the decode
# step against the forward alone, `bench serve` at concurrency 32 and 128 with its baselines,
# and `bench tensor` with CUDA tensor workers; one JSON summary last (scripts/gpu_check.py says
# what each field is). Under 8 minutes on one H100 or H200.
#   scripts/gpu_check.sh [--device cuda|cpu] [--out FILE] [--only STEP,...]
# --device cpu runs the same steps on the tiny model as a smoke test (tests/test_gpu_check.py).
# Where zeroserve or its dependencies are missing (a GPU machine with torch and no network),
# it installs them from wheels in .whl/ (../shared/tools/gpu-wheels makes them) into
# $ZEROSERVE_SITE (default /tmp/zs-site); the machine's own torch is used.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
[ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py=$root/.venv/bin/python
if ! (cd / && "$py" -c "import zmq, fastapi, llguidance, zeroserve.workers.llm") 2>/dev/null; then
  [ -d "$root/.whl" ] || { echo "gpu_check: zeroserve is not installed and there is no .whl/" >&2; exit 1; }
  site=${ZEROSERVE_SITE:-/tmp/zs-site}
  echo "gpu_check: installing from .whl/ into $site" >&2
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$root"/.whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$root"
fi
exec "$py" -P "$root/scripts/gpu_check.py" --root "$root" "$@"
