#!/usr/bin/env bash
# The offline demo: one whole round on embedded defaults (configs/demo.yaml). `make demo` runs this.
# Starts the local Argilla server (and leaves it running so you can look at the records in its UI).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_ENABLE_V1_MULTIPROCESSING=0
CURATE=.venv/bin/curate
CONFIG=${CONFIG:-configs/demo.yaml}
start=$(date +%s)

$CURATE validate "$CONFIG" || exit $?
$CURATE models fetch || exit $?
$CURATE argilla up || exit $?
$CURATE round run -c "$CONFIG" "$@"
rc=$?
$CURATE status -c "$CONFIG"
echo
echo "demo finished in $(( $(date +%s) - start )) s (exit $rc) on $(.venv/bin/python -c \
  'from preference.plumbing.hardware import describe, hardware_summary, resolve_dtype; print(describe(hardware_summary(resolve_dtype("auto"))))')"
echo "target:      ≤ 360 s with models cached, ≤ 480 s from an empty model cache, on 2 AVX2-only cores (measured" \
  "figures and where the time goes: README, \"Where the demo's time goes\")"
echo "artifacts:   $(sed -n 's/^project: *//p' "$CONFIG")/round-*/   (report: <round>/report/report.html)"
echo "Argilla UI:  http://127.0.0.1:6900  (user curate, password curate-dev-password); stop: $CURATE argilla down"
exit $rc
