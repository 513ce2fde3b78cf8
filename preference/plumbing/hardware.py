"""What this machine can do, and the precision and thread count every model path uses: decided here only.

    features = cpu_features()                # {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx": False}
    dtype = resolve_dtype("auto")            # "bfloat16" where bf16 is fast, else "float32"
    threads = resolve_threads(None)          # the cores this process may run on (its CPU affinity)

Precision (`dtype: auto`): bf16 only where the hardware computes it natively — CUDA with bf16, or a CPU with
AVX512-BF16 or AMX. On other CPUs (AVX2-only laptops and many cloud VMs) bf16 is emulated and measured 2.8–4.2×
slower than fp32 in vLLM, so `auto` means fp32 there. An explicit `bfloat16` / `float32` always wins.

Threads (`threads: null`): the number of CPUs in this process's affinity mask (`os.sched_getaffinity`), which
honours `taskset`, cgroups' cpusets and container limits, instead of a fixed 1 or 2. An explicit number wins.

Every step records `hardware_summary()` in its manifest, and dtypes are part of the cache keys, so outputs of
different precisions never mix.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Literal

Dtype = Literal["auto", "bfloat16", "float32"]
DTYPES = ("auto", "bfloat16", "float32")

# /proc/cpuinfo flag names → the feature names we report
_FLAGS = {"avx2": "avx2", "avx512f": "avx512f", "avx512_bf16": "avx512_bf16", "amx_bf16": "amx", "amx_tile": "amx"}


@functools.cache
def cpu_features() -> dict[str, bool]:
    """{"avx2", "avx512f", "avx512_bf16", "amx"} → present on this CPU (from /proc/cpuinfo, else torch's probes)."""
    found = {name: False for name in dict.fromkeys(_FLAGS.values())}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                for flag, name in _FLAGS.items():
                    found[name] = found[name] or flag in flags
                break
        return found
    try:  # not Linux: ask torch (its probes cover bf16 and AMX)
        import torch

        found["avx512_bf16"] = bool(torch.cpu._is_avx512_bf16_supported())
        found["amx"] = bool(torch.cpu._is_amx_tile_supported())
        found["avx512f"] = bool(torch.cpu._is_avx512_supported())
        found["avx2"] = bool(torch.cpu._is_avx2_supported())
    except (ImportError, AttributeError):
        pass
    return found


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def fast_bf16() -> bool:
    """True when bf16 runs natively here: CUDA with bf16, or a CPU with AVX512-BF16 or AMX."""
    if cuda_available():
        import torch

        return bool(torch.cuda.is_bf16_supported())
    features = cpu_features()
    return features["avx512_bf16"] or features["amx"]


def resolve_dtype(dtype: str) -> str:
    """"auto" → "bfloat16" where bf16 is fast (see `fast_bf16`), else "float32"; explicit dtypes unchanged."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bf16() else "float32"


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cpusets, container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """`None` → every usable core (see `usable_cores`); an explicit positive number is kept."""
    if threads is None:
        return usable_cores()
    if threads < 1:
        raise ValueError(f"threads must be ≥ 1 or null (= all usable cores), got {threads}")
    return threads


def hardware_summary(dtype: str | None = None, threads: int | None = None) -> dict:
    """What a step ran on, for manifests and benchmark output: CPU, features, GPU, cores, dtype and threads."""
    out = {
        "cpu": cpu_name(),
        "features": [name for name, present in cpu_features().items() if present],
        "cuda": cuda_available(),
        "usable_cores": usable_cores(),
    }
    if dtype is not None:
        out["dtype"] = dtype
    if threads is not None:
        out["threads"] = threads
    return out


def describe(summary: dict | None = None) -> str:
    """One line: `AMD EPYC · AVX2 (no AVX-512, no AMX) · 2 cores · float32 · 2 threads`."""
    s = summary or hardware_summary()
    feats = set(s["features"])
    if "avx512_bf16" in feats or "amx" in feats:
        isa = "AVX-512 with bf16" + (" + AMX" if "amx" in feats else "")
    elif "avx512f" in feats:
        isa = "AVX-512 (no bf16)"
    elif "avx2" in feats:
        isa = "AVX2 only (no AVX-512, no AMX)"
    else:
        isa = "no AVX2"
    parts = [s["cpu"], isa, f"{s['usable_cores']} cores"] + (["CUDA"] if s.get("cuda") else [])
    if "dtype" in s:
        parts.append(s["dtype"])
    if "threads" in s:
        parts.append(f"{s['threads']} threads")
    return " · ".join(parts)
