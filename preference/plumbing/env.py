"""Process environment the whole tool relies on, applied by the entry points (the `curate` CLI, scripts,
`training.launch`, the test conftest) before torch is imported. Importing a package never changes it.

- OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning; without it torch steps stall
  100x whenever another process is busy on a 2-core machine.
- HF_HUB_OFFLINE=1: models and datasets never come from a hub at run time; they come from local folders.
- HF_HUB_DISABLE_TELEMETRY=1, TOKENIZERS_PARALLELISM=false: no network, no fork warnings.
Only defaults are set; a user's explicit value wins.
"""

import os

DEFAULTS = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # Library chatter (load reports, deprecation notes) hides our own progress and errors; set these to
    # "info"/"INFO" to see it again.
    "TRANSFORMERS_VERBOSITY": "error",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def apply_env_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
