#!/usr/bin/env bash
# GPU checks in one go (for a lent CUDA machine): the CUDA tests (pytest -m cuda), then
# benchmarks/engine.py on cuda, profiles of the GPT-2-small-sized step, the engine under bf16 autocast,
# benchmarks/lazydp.py on cuda, and the CPU noise sources on the GPU machine's cores (the Philox
# kernel is built in place first, from pyproject.toml's ext-modules; without it CPU noise falls back
# to torch's streams and the log says so).
# Logs and JSON go to $OUT (default ./gpu_out). Each part has its own time limit so that one
# slow part cannot take the others' time. On an H200 the whole run takes about 7 minutes
# (2026-11-26; opacus hooks and the eager noise floor are left out by default: add them with
# ENGINE_MODES / LAZY_MODES).   Usage: bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
LOG="$OUT/log.txt"  # machine, then every part's stderr (the device tool returns at most 8 files)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc; date -u
  $py -c "import torch, opacus; print('torch', torch.__version__, 'opacus', opacus.__version__, torch.cuda.get_device_name(0))"
} > "$LOG" 2>&1
$py -c "from setuptools import setup; setup()" build_ext --inplace -q >> "$LOG" 2>&1
$py -c "from mechanisms import philox_normals as p; print('Philox kernel built:', p.available())" >> "$LOG" 2>&1
cat "$LOG"
part() {  # part NAME SECONDS COMMAND...: stdout to NAME.out, stderr appended to log.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name" >> "$LOG"
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/err.tmp"
  local rc=$?
  cat "$OUT/err.tmp" >> "$LOG"; rm -f "$OUT/err.tmp"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  grep -v Warning "$LOG" | tail -n 4
}
part cuda_tests "${T_TESTS:-120}" $py -m pytest -q -m cuda -p no:cacheprovider tests
tail -n 15 "$OUT/cuda_tests.out"
part engine_cuda "${T_ENGINE:-220}" $py benchmarks/engine.py --device cuda --repeats "${REPEATS:-7}" \
  --modes ${ENGINE_MODES:-nonprivate dptrain opacus-ghost}
part profile_gpt2 "${T_PROFILE:-60}" bash -c "for mode in nonprivate dptrain; do
  $py benchmarks/profile_step.py --model gpt2small --mode \$mode --device cuda; done"
part engine_cuda_amp "${T_AMP:-90}" $py benchmarks/engine.py --device cuda --amp --repeats "${REPEATS:-7}" \
  --models transformer gpt2small --modes nonprivate dptrain
part lazydp_cuda "${T_LAZY:-200}" $py benchmarks/lazydp.py --device cuda --repeats "${REPEATS:-7}" --max-gb 100 \
  --pair-steps "${PAIR_STEPS:-30}" --modes ${LAZY_MODES:-nonprivate eager lazy}
part noise_streams_cpu "${T_NOISE:-60}" $py benchmarks/noise_streams.py
