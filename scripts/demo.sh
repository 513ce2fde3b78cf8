#!/usr/bin/env bash
# The offline demo (configs/demo.yaml): the bootstrap from seed labels (round 0), then one whole round. `make demo`
# runs this.
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
# the learning the demo shows: held-out reward accuracy after the bootstrap (round 0) and after each round
.venv/bin/python - "$(sed -n 's/^project: *//p' "$CONFIG")" <<'PY'
import json, sys
from pathlib import Path
for m in sorted(Path(sys.argv[1]).glob("round-*/evaluate/manifest.json")):
    e = json.loads(m.read_text())
    if e.get("reward_accuracy") is not None:
        lo, hi = e.get("reward_ci") or (float("nan"), float("nan"))
        name = "bootstrap (round 0)" if e["round"] == 0 else f"round {e['round']}"
        print(f"held-out reward accuracy after {name}: {e['reward_accuracy']:.3f} (95% CI {lo:.3f}–{hi:.3f}, "
              f"{e['counts']['heldout_pairs']} pairs)")
PY
echo "demo finished in $(( $(date +%s) - start )) s (exit $rc) on $(.venv/bin/python -c \
  'from preference.plumbing.hardware import describe, hardware_summary, resolve_dtype; print(describe(hardware_summary(resolve_dtype("auto"))))')"
echo "target:      ≤ 300 s on 2 cores with AVX512-BF16/AMX, ≤ 600 s on 2 AVX2-only cores (measured figures:" \
  "scripts/README.md, \"The demo with a bootstrap\")"
echo "artifacts:   $(sed -n 's/^project: *//p' "$CONFIG")/round-*/   (report: <round>/report/report.html)"
echo "Argilla UI:  http://127.0.0.1:6900  (user curate, password curate-dev-password); stop: $CURATE argilla down"
exit $rc
