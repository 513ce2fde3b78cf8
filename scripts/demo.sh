#!/usr/bin/env bash
# The offline demo: one whole round on embedded defaults (configs/demo.yaml). `make demo` runs this.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_ENABLE_V1_MULTIPROCESSING=0
CURATE=.venv/bin/curate
CONFIG=${CONFIG:-configs/demo.yaml}

$CURATE validate "$CONFIG" || exit $?
$CURATE models fetch || exit $?
$CURATE round run -c "$CONFIG"
rc=$?
$CURATE status -c "$CONFIG"
exit $rc
