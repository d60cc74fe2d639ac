#!/usr/bin/env bash
# What issue 4 needs from a lent GPU machine, in stages that each fit one 10-minute device command.
#
# Here, once:   bench/device_wheels.sh                      (pydantic & co. into .wheels for the GPU box)
# There:        bench/gpu_session.sh STAGE [STAGE...]       (the device tool's `run`, carry [".whl"])
#
# Stages (results as JSON/text under $OUT, or bench/results/ without $OUT):
#   env       GPU, driver, torch, and the wheels installed
#   tests     the tick tests on the GPU: CUDA graph vs eager, bit for bit, over joins/leaves/aborts
#   eager     callcenter bench --full, eager tick
#   graph     ... with the tick replayed as a CUDA graph
#   compiled  ... compiled with inductor and replayed as a CUDA graph (1 and 32 slots: compiling is slow)
#   profile   kernels per tick and GPU time per tick at 1 and 32 slots (bench/profile_tick.py)
# Set COMMIT=<short sha> so the JSON names the commit (the device's copy has no .git).
# PYTHON (default python3, the GPU image's torch interpreter), MODEL (default --full; empty: the
# tiny model, to try the script on a CPU), SLOTS, TICKS, COMPILED_SLOTS, PROFILE_SLOTS tune it.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 STAGE [STAGE...] (env tests eager graph compiled profile)" >&2; exit 2; }
for stage in "$@"; do
    case $stage in
        env | tests | eager | graph | compiled | profile) ;;
        *) echo "unknown stage $stage (env tests eager graph compiled profile)" >&2; exit 2 ;;
    esac
done
out=${OUT:-bench/results}
mkdir -p "$out"
python=${PYTHON:-python3}
model=${MODEL---full}
if [ -d .whl ] && ! "$python" -c 'import pydantic_settings' 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 LOG_LEVEL=${LOG_LEVEL:-warning} CALLCENTER_COMMIT=${COMMIT:-}
slots=${SLOTS:-1,8,16,24,32,40}
ticks=${TICKS:-100}
status=0

bench() {  # name, extra flags...
    local name=$1
    shift
    echo "== bench $name" >&2
    "$python" bench/engine_tick.py $model --slots "$slots" --ticks "$ticks" --warmup 10 "$@" \
        --json-out "$out/bench-$name.json" 2> >(tee "$out/bench-$name.log" >&2) || status=1
}

for stage in "$@"; do
    case $stage in
        env)
            { nvidia-smi; "$python" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
              "$python" -m pip list 2>/dev/null | grep -Ei '^(torch|triton|numpy|pydantic) '; } | tee "$out/env.txt" || status=1 ;;
        tests)
            "$python" -m pytest -q -p no:cacheprovider tests/worker/test_tick.py 2>&1 | tee "$out/tests.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
        eager) bench eager ;;
        graph) bench graph --cuda-graph ;;
        compiled) slots=${COMPILED_SLOTS:-1,32} bench compiled --compile --cuda-graph ;;
        profile)
            tiny=$([ -n "$model" ] || echo --tiny)
            "$python" bench/profile_tick.py $tiny --slots "${PROFILE_SLOTS:-1,32}" --cuda-graph | tee "$out/profile.jsonl"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    esac
done
exit $status
