"""Scale: the round's non-model steps on a synthetic pool of 10k, 100k and 1M prompts, memory and time per step.

    nice -n 10 python scripts/bench_scale.py                       # 10k, 100k, 1M (≈ 1 h on 2 cores)
    python scripts/bench_scale.py --sizes 2000 --work /tmp/scale   # a small run (what the test does)

Protocol (fixed before the runs):
- Pool: N distinct synthetic prompts, 8–40 words each (Zipf-distributed draws from a fixed vocabulary of 30,000
  pseudo-words, seed 0), plus 1 % planted exact duplicates (an earlier prompt upper-cased with extra spaces) and
  1 % planted near duplicates (an earlier prompt with one word appended: word 3-gram Jaccard ≥ 6/7 > 0.85), in
  seeded random positions after their originals, written as one jsonl file.
- Round config: the `dummy` backend (no model: what is measured is the product's own cost), `generation.n: 3`,
  `max_tokens: 32`, generation cache off (it is one JSON file per prompt by design); a 2-member committee
  (`dummy-a-d384`, `dummy-b`) whose first member embeds (`embedding_model: null`; the dummy's `-d384`: a
  hashing-trick bag of words in 384 dimensions, all-MiniLM-L6-v2's width);
  `selection.k` = 2 % of N with the default strategy (`reward_disagreement|kcenter`: round 1 has no reward model,
  so k-center over the whole pool picks the strategy arm) and a 25 % random arm.
- Steps pool, generate, score, rewards, select, each as `curate <step> -c <config> -q` in a process of its own
  (niced when this script is), one after the other. Measured per step: wall time of the process (interpreter
  start and imports included), the step's own time (its manifest's `seconds`), time per prompt (the step's own
  time / N), and the process's peak RSS (its VmHWM, written at exit). The load average is printed beside each row
  (the machine is shared), and the CPU's features once.
- Checks that the figures come from this run: the pool step's manifest counts equal the planted pool (N prompts
  kept, the planted exact and near duplicates removed), generate wrote 3·N completions, score N prompt rows, and
  select k rows; the script fails (exit 1) otherwise.
- `--select-only N`: `curate select` alone (its own process, the same selection config) over a synthetic scored
  round of N prompts (random signals; embeddings from 64 Gaussian clusters in 384 dimensions, L2-normalized;
  3 completions per prompt), written through the round store like the real steps' outputs: the select target
  at 1M without running generate and score at 1M.
- `--select-only N --select-shards S`: after that row, the same select with `selection.sharding: {backend: ray,
  address: local, num_shards: S}` (curation/steps/select.py, its Ray part: each shard reduced on a Ray worker process). Its
  row gives the driver process's peak RSS (the workers are other processes: not counted) and the rows the workers
  sent back; the check is that they sent fewer rows than the pool has and the step selected k rows.
- Targets (2 cores, 24 GB), printed as PASS/FAIL at the largest size ≥ 1M that ran: peak RSS ≤ 4 GB in every
  step; per step, time per prompt at 1M ≤ 1.3 × that at 10k (the step's own time; the process start is a constant,
  not a per-prompt cost); select over 1M × 384 ≤ 60 s (its own time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = ("pool", "generate", "score", "rewards", "select")
VOCAB = 30_000
GB = 1024**3


def pseudo_words(n: int, seed: int = 0) -> list[str]:
    """n distinct pronounceable pseudo-words (syllable strings)."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["qua", "tho", "shi", "ble"]
    out: dict[str, None] = {}
    while len(out) < n:
        parts = rng.integers(0, len(syllables), size=(n, 3))
        lengths = rng.integers(1, 4, size=n)
        for row, length in zip(parts, lengths, strict=True):
            out.setdefault("".join(syllables[i] for i in row[:length]), None)
            if len(out) == n:
                break
    return list(out)


def make_pool(path: Path, n: int, seed: int = 0) -> dict[str, int]:
    """Write N distinct prompts + 1 % exact + 1 % near duplicates to `path` (jsonl); return what was planted."""
    rng = np.random.default_rng(seed)
    words = np.asarray(pseudo_words(VOCAB, seed), dtype=object)
    zipf = 1.0 / np.arange(1, VOCAB + 1) ** 0.8
    zipf /= zipf.sum()
    n_exact = n_near = n // 100
    lengths = rng.integers(8, 41, size=n)
    seen: set[str] = set()
    texts: list[str] = []
    while len(texts) < n:
        draw = rng.choice(VOCAB, size=int(lengths[len(texts)]), p=zipf)
        text = " ".join(words[draw])
        if text not in seen:  # distinct (a repeat is vanishingly rare; redrawn if it happens)
            seen.add(text)
            texts.append(text)
    lines = [json.dumps({"prompt": t}) for t in texts]
    extra = []
    for i in rng.choice(n, size=n_exact, replace=False):
        extra.append((int(i), json.dumps({"prompt": "  " + texts[i].upper().replace(" ", "  ") + " "})))
    for i in rng.choice(n, size=n_near, replace=False):
        extra.append((int(i), json.dumps({"prompt": texts[i] + " " + str(words[rng.integers(VOCAB)])})))
    # each duplicate goes somewhere after its original
    slots: dict[int, list[str]] = {}
    for i, line in extra:
        slots.setdefault(int(rng.integers(i, n)), []).append(line)
    with open(path, "w") as fh:
        for i, line in enumerate(lines):
            fh.write(line + "\n")
            for dup in slots.get(i, []):
                fh.write(dup + "\n")
    return {"distinct": n, "exact": n_exact, "near": n_near, "lines": n + n_exact + n_near}


def write_config(path: Path, project: Path, pool: Path, n: int, embedding_model: str) -> int:
    k = max(4, n // 50)
    path.write_text(f"""\
project: {project}
seed: 0
pool:
  sources: [{{path: {pool}, format: jsonl}}]
generation:
  backend: {{name: dummy}}
  models: [dummy]
  n: 3
  max_tokens: 32
  cache: false
scoring:
  backend: {{name: dummy}}
  committee: [{embedding_model}, dummy-b]
  embedding_model: null
selection:
  k: {k}
  random_share: 0.25
""")
    return k


def synthetic_scored_round(project: Path, pool: Path, n: int, dims: int = 384, seed: int = 0) -> None:
    """A round whose pool, generate and score steps are synthetic (random signals; embeddings: 64 Gaussian
    clusters in `dims` dimensions, float32), written through the round store like the real steps' outputs, so
    that `curate select` can be timed over N × dims without running generate and score at N."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from preference.plumbing.io import RowWriter
    from preference.plumbing.store import Project

    rng = np.random.default_rng(seed)
    rnd = Project(project).round(1, create=True)
    centers = rng.normal(size=(64, dims)).astype(np.float32)
    ids = [f"p{i:09d}" for i in range(n)]
    chunk = 65_536

    def embeddings(m: int) -> np.ndarray:
        x = centers[rng.integers(0, 64, m)] + 0.5 * rng.normal(size=(m, dims)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def as_list(x: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(np.arange(len(x) + 1, dtype=np.int32) * dims),
                                        pa.array(x.reshape(-1), type=pa.float32()))

    with rnd.start_step("pool", {"synthetic": n}) as run, RowWriter(run.path / "prompts.parquet") as out:
        for a in range(0, n, chunk):
            out.write_table(pa.table({"id": ids[a : a + chunk], "messages": [[{"role": "user", "content": f"prompt {i}"}]
                                                                            for i in range(a, min(n, a + chunk))],
                                      "slice": ["default"] * len(ids[a : a + chunk]),
                                      "source": [str(pool)] * len(ids[a : a + chunk]),
                                      "metadata": ["{}"] * len(ids[a : a + chunk])}))
    with rnd.start_step("generate", {"synthetic": n}) as run, RowWriter(run.path / "completions.parquet") as out:
        for a in range(0, n, chunk):
            rows = range(a, min(n, a + chunk))
            out.write_table(pa.table({"id": [f"c{i}-{j}" for i in rows for j in range(3)],
                                      "prompt_id": [ids[i] for i in rows for _ in range(3)],
                                      "model": ["dummy"] * (3 * len(rows)),
                                      "text": [f"answer {j} to {i}" for i in rows for j in range(3)]}))
    with rnd.start_step("score", {"synthetic": n}) as run:
        signals = ("prompt_perplexity", "mean_completion_perplexity", "mean_logprob", "mean_entropy",
                   "committee_disagreement", "committee_range", "vote_entropy", "semantic_spread")
        files = {}
        for name, raw_name, per in (("prompt_scores.parquet", "prompt_embeddings.f32", 1),
                                    ("completion_scores.parquet", "completion_embeddings.f32", 3)):
            with RowWriter(run.path / name) as out, open(run.path / raw_name, "wb") as raw:
                for a in range(0, n, chunk):
                    rows = range(a, min(n, a + chunk))
                    x = embeddings(len(rows) * per)
                    raw.write(x.tobytes())
                    if per == 1:
                        cols = {"prompt_id": [ids[i] for i in rows], "slice": ["default"] * len(rows)}
                        cols.update({s: rng.random(len(rows)) for s in signals})
                    else:
                        cols = {"completion_id": [f"c{i}-{j}" for i in rows for j in range(3)],
                                "prompt_id": [ids[i] for i in rows for _ in range(3)],
                                "model": ["dummy"] * (3 * len(rows)), "committee_std": rng.random(3 * len(rows))}
                    out.write_table(pa.table(cols).append_column("embedding", as_list(x)))
            files[name] = {"file": raw_name, "rows": n * per, "dims": dims}
        run.extra["embedding_files"] = files
    del pq


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# `curate <step>` with its own peak RSS written at exit: VmHWM of the process's own address space. (The wait4
# rusage's ru_maxrss is not used: on Linux a child inherits the forking parent's high-water mark, so every step
# would report at least this script's own memory, which holds the synthetic pool while it writes it.)
LAUNCHER = """import atexit, os, runpy, sys
def hwm():
    with open('/proc/self/status') as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith('VmHWM'))
    with open(os.environ['CURATE_BENCH_HWM'], 'w') as out:
        out.write(str(kb))
atexit.register(hwm)
sys.argv = ['curate'] + sys.argv[1:]
runpy.run_module('curation.cli', run_name='__main__')
"""


def run_step(step: str, config: Path, env: dict, log: Path, *extra: str) -> dict:
    """One step in its own process: wall seconds and peak RSS (bytes) of that process (its VmHWM)."""
    hwm = log.with_suffix(".hwm")
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, step, "-c", str(config), "-q", *extra], cwd=ROOT,
                              env={**env, "CURATE_BENCH_HWM": str(hwm)}, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"curate {step} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"wall": wall, "rss": int(hwm.read_text()) * 1024}


def cpu_line() -> str:
    from preference.plumbing.hardware import describe

    return describe()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated pool sizes")
    ap.add_argument("--work", type=Path, default=None, help="folder for pools and projects (default: a temp dir)")
    ap.add_argument("--embedding-model", default="dummy-a-d384",
                    help="the first committee member, which embeds (dummy-<name>-d<dims>)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps to run, in round order")
    ap.add_argument("--keep", action="store_true", help="keep the projects (default: each is removed after its size)")
    ap.add_argument("--select-only", type=int, default=None, metavar="N",
                    help="time `curate select` alone over a synthetic scored round of N prompts × 384 (see "
                         "synthetic_scored_round) and exit")
    ap.add_argument("--select-shards", type=int, default=0, metavar="S",
                    help="with --select-only: also select with the pool reduced on S local Ray workers")
    args = ap.parse_args(argv)
    if args.select_only:
        return select_only(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="curate-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CURATE_CACHE": str(work / "cache")}
    print(cpu_line())
    print(f"work folder {work}; niceness {os.nice(0)}; load average {loadavg()}")
    print("| N | step | wall s (process) | step s | µs/prompt | peak RSS GB | load avg | counts |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict[int, dict[str, dict]] = {}
    ok = True
    for n in sizes:
        base = work / f"n{n}"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        planted = make_pool(base / "pool.jsonl", n)
        config = base / "round.yaml"
        k = write_config(config, base / "project", base / "pool.jsonl", n, args.embedding_model)
        results[n] = {}
        for step in [s for s in STEPS if s in args.steps.split(",")]:
            got = run_step(step, config, env, base / f"{step}.log")
            manifest = json.loads((base / "project" / "round-0001" / step / "manifest.json").read_text())
            got.update(seconds=manifest["seconds"], counts=manifest["counts"])
            results[n][step] = got
            counts = ", ".join(f"{key}={manifest['counts'][key]}" for key in
                               ("read", "prompts", "exact_duplicates", "near_duplicates", "completions", "selected")
                               if key in manifest["counts"])
            print(f"| {n:,} | {step} | {got['wall']:.1f} | {got['seconds']:.1f} | {1e6 * got['seconds'] / n:.0f} | "
                  f"{got['rss'] / GB:.2f} | {loadavg()} | {counts} |", flush=True)
        if set(results[n]) != set(STEPS):  # a partial run (--steps): its rows, no checks or targets
            ok = None if ok is True else ok
            continue
        checks = {
            "pool kept the distinct prompts": results[n]["pool"]["counts"]["prompts"] == planted["distinct"],
            "pool read every line": results[n]["pool"]["counts"]["read"] == planted["lines"],
            "pool removed the planted exact duplicates": results[n]["pool"]["counts"]["exact_duplicates"]
            == planted["exact"],
            "pool removed the planted near duplicates": results[n]["pool"]["counts"]["near_duplicates"]
            == planted["near"],
            "generate: 3 completions per prompt": results[n]["generate"]["counts"]["completions"] == 3 * n,
            "score: one row per prompt": results[n]["score"]["counts"]["prompts"] == n,
            "select: k rows": results[n]["select"]["counts"]["selected"] == k,
        }
        for name, passed in checks.items():
            if not passed:
                print(f"check FAILED at N={n:,}: {name}")
                ok = False
        if not args.keep:
            shutil.rmtree(base / "project", ignore_errors=True)
    print("checks: not run (a partial run: --steps)" if ok is None else
          f"checks: {'ok' if ok else 'FAILED'} (counts match the planted pools)")
    big = [n for n in sizes if n >= 1_000_000 and set(results[n]) == set(STEPS)]
    small = min(sizes)
    if big:
        n = max(big)
        rss_ok = all(results[n][s]["rss"] <= 4 * GB for s in STEPS)
        ratios = {s: (results[n][s]["seconds"] / n) / max(results[small][s]["seconds"] / small, 1e-12) for s in STEPS}
        print(f"target peak RSS ≤ 4 GB at {n:,} in every step: {'PASS' if rss_ok else 'FAIL'} "
              f"(max {max(results[n][s]['rss'] for s in STEPS) / GB:.2f} GB)")
        print("target time per prompt at {:,} ≤ 1.3 × at {:,}: {} ({})".format(
            n, small, "PASS" if all(r <= 1.3 for r in ratios.values()) else "FAIL",
            ", ".join(f"{s} {r:.2f}×" for s, r in ratios.items())))
        sel = results[n]["select"]["seconds"]
        print(f"target select over {n:,} × 384 ≤ 60 s: {'PASS' if sel <= 60 else 'FAIL'} ({sel:.1f} s)")
    return 0 if ok is not False else 1


def select_only(args) -> int:
    """`curate select` in its own process over a synthetic scored round of N × 384 (the select target)."""
    n = args.select_only
    work = args.work or Path(tempfile.mkdtemp(prefix="curate-scale-"))
    base = work / f"select-n{n}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    env = {**os.environ, "CURATE_CACHE": str(work / "cache")}
    print(cpu_line())
    t0 = time.monotonic()
    synthetic_scored_round(base / "project", base / "none.jsonl", n)
    print(f"synthetic scored round of {n:,} prompts × 384 (3 completions each) built in {time.monotonic() - t0:.0f} s; "
          f"load average {loadavg()}")
    config = base / "round.yaml"
    k = write_config(config, base / "project", base / "none.jsonl", n, "dummy-a-d384")
    got = run_step("select", config, env, base / "select.log")
    manifest = json.loads((base / "project" / "round-0001" / "select" / "manifest.json").read_text())
    print("| N | step | wall s (process) | step s | µs/prompt | peak RSS GB | load avg | counts |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n:,} | select (synthetic scores) | {got['wall']:.1f} | {manifest['seconds']:.1f} | "
          f"{1e6 * manifest['seconds'] / n:.0f} | {got['rss'] / GB:.2f} | {loadavg()} | "
          f"selected={manifest['counts']['selected']}, scored={manifest['counts']['scored']} |")
    ok = manifest["counts"]["selected"] == k and manifest["counts"]["scored"] == n
    if args.select_shards:
        text = config.read_text().replace("selection:\n", "selection:\n  sharding: {backend: ray, address: local, "
                                          f"num_shards: {args.select_shards}}}\n")
        config.write_text(text)
        got = run_step("select", config, env, base / "select-sharded.log", "--force")
        sharded = json.loads((base / "project" / "round-0001" / "select" / "manifest.json").read_text())
        info = sharded.get("sharding", {})
        print(f"| {n:,} | select, {args.select_shards} Ray shards (driver RSS) | {got['wall']:.1f} | "
              f"{sharded['seconds']:.1f} | {1e6 * sharded['seconds'] / n:.0f} | {got['rss'] / GB:.2f} | {loadavg()} | "
              f"selected={sharded['counts']['selected']}, rows sent back={info.get('rows_returned')} |")
        ok = ok and sharded["counts"]["selected"] == k and info.get("shards") == args.select_shards \
            and info.get("rows_returned", n) < n
    print(f"target select over {n:,} × 384 ≤ 60 s: {'PASS' if manifest['seconds'] <= 60 else 'FAIL'} "
          f"({manifest['seconds']:.1f} s); peak RSS ≤ 4 GB: {'PASS' if got['rss'] <= 4 * GB else 'FAIL'}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
