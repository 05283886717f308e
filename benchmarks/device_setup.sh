# Set up the GPU machine of the device tool for the benchmarks, then run the command given.
#
#   bash benchmarks/device_setup.sh python3 benchmarks/bench_fresh_process.py --runs 2 --json $OUT/fresh.json
#
# The machine has torch and transformers but not diffusers (carry the wheels in .whl, see
# benchmarks/README.md), and its image sets PYTHONDONTWRITEBYTECODE=1 with torch and sympy shipped
# without .pyc: without the compileall below every process compiles torch from source (import torch
# 4.2 s instead of 1.9 s), which a user's pip install never does.
set -e
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
SP=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m compileall -q -j 0 "$SP/torch" "$SP/sympy" "$SP/numpy" "$SP/PIL" /tmp/site > /dev/null || true
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
"$@"
