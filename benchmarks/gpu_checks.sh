#!/usr/bin/env bash
# GPU checks in one go (for a lent CUDA machine): the CUDA tests (pytest -m cuda), then
# benchmarks/engine.py and benchmarks/lazydp.py on cuda, then the engine under bf16 autocast.
# Logs and JSON go to $OUT (default ./gpu_out). Each part has its own time limit so that one
# slow part cannot take the others' time.   Usage: bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc; date -u
  $py -c "import torch, opacus; print('torch', torch.__version__, 'opacus', opacus.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
part() {  # part NAME SECONDS COMMAND...: stdout to NAME.json (or .txt), stderr to NAME.err
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  echo "== $name: exit $? after $((SECONDS - t0)) s"
  tail -n 4 "$OUT/$name.err"
}
part cuda_tests "${T_TESTS:-120}" $py -m pytest -q -m cuda -p no:cacheprovider tests
tail -n 15 "$OUT/cuda_tests.out"
part engine_cuda "${T_ENGINE:-220}" $py benchmarks/engine.py --device cuda --repeats "${REPEATS:-10}"
part lazydp_cuda "${T_LAZY:-170}" $py benchmarks/lazydp.py --device cuda --repeats "${REPEATS:-10}" --max-gb 100
part engine_cuda_amp "${T_AMP:-90}" $py benchmarks/engine.py --device cuda --amp --repeats "${REPEATS:-10}" \
  --models transformer gpt2small --modes nonprivate dptrain
