"""Which committee members disagree informatively? Candidate second members beside the generator, on a round's pool.

Runs the real `pool` and `generate` steps of a round config (default: configs/demo.yaml, 48 HH-harmless prompts
× 3 completions + the 2 human reference answers each), then one `score` step whose committee is the generator
plus every candidate, and compares each candidate with the generator:

- vote>0: share of prompts where the two members' favourite completion differs (vote_entropy > 0 for the pair);
- disagreement: mean over completions of |Δ mean logprob| between the two members (committee_range);
- flips: share of prompts where the two members order the human chosen / rejected answers differently;
- ref acc: how often the member itself prefers the human-chosen answer (mean logprob chosen > rejected);
- when they flip, the candidate is right: of the flipped prompts, the share where the candidate agrees with the
  human label (an informative disagreement is one a label resolves, with a member that is often right).

Candidates (`--members`): weight noise (`:noise=0.02:seed=1`, what the demo used), system-prompt personas
(`:system=cautious`, `:system=compliant`) and `champion`: a DPO adapter trained like the demo's `train_dpo` step
(`--dpo-steps`) on HH pairs outside the pool, registered as the champion (what round 2 of the demo would use).
Per-step wall times and the hardware are printed too.

    python scripts/bench_committee.py [--config configs/demo.yaml] [--work /tmp/bench-committee]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preference.plumbing.env import apply_env_defaults  # noqa: E402

apply_env_defaults()  # before torch is imported

import numpy as np  # noqa: E402

from curation.config import load_config  # noqa: E402
from curation.steps.generate import run_generate  # noqa: E402
from curation.steps.pool import run_pool  # noqa: E402
from curation.steps.score import member_name, run_score  # noqa: E402
from preference.plumbing.io import read_rows  # noqa: E402
from preference.plumbing.store import Project  # noqa: E402

CANDIDATES = ":noise=0.02:seed=1,:system=cautious,:system=compliant,champion"


def train_champion(cfg, registry: Path, steps: int, work: Path) -> None:
    """A DPO adapter trained as the demo's train_dpo step would, on HH pairs whose prompts are not in the pool."""
    from training.data import load_hh_pairs
    from training.dpo import train_dpo
    from training.registry import Registry

    pairs = load_hh_pairs(cfg.evaluation.heldout)[400:]  # the demo pool comes from the first 400 (the sample)
    dpo = dataclasses.replace(cfg.dpo, max_steps=steps)
    t0 = time.perf_counter()
    train_dpo(pairs[: 4 * steps * dpo.batch_size], dpo, work / "dpo", seed=0, progress=False)
    reg = Registry(registry)
    reg.promote(reg.register({"policy": work / "dpo" / "model"}, metrics={}, lineage={}, config={}))
    print(f"champion: DPO {steps} steps on {4 * steps * dpo.batch_size} pairs in {time.perf_counter() - t0:.0f} s")


def compare(comps: list[dict], generator: str, member: str) -> dict:
    by_prompt: dict[str, list[dict]] = {}
    for c in comps:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
    votes, flips, acc, right, ranges = [], [], [], [], []
    for rows in by_prompt.values():
        g = np.array([r[f"logprob_mean::{generator}"] for r in rows])
        m = np.array([r[f"logprob_mean::{member}"] for r in rows])
        votes.append(g.argmax() != m.argmax())
        ranges.append(np.abs(g - m).mean())
        ref = {r["model"]: (r[f"logprob_mean::{generator}"], r[f"logprob_mean::{member}"]) for r in rows}
        if {"reference:chosen", "reference:rejected"} <= set(ref):
            (gc, mc), (gr, mr) = ref["reference:chosen"], ref["reference:rejected"]
            acc.append(mc > mr)
            if (gc > gr) != (mc > mr):
                flips.append(True)
                right.append(mc > mr)
            else:
                flips.append(False)
    return {"vote>0": np.mean(votes), "disagreement": np.mean(ranges), "flips": np.mean(flips) if flips else 0,
            "ref acc": np.mean(acc) if acc else float("nan"), "right when flipped": np.mean(right) if right else None,
            "flipped": len(right)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--work", default="/tmp/bench-committee", help="project folder (reused: finished steps skip)")
    ap.add_argument("--members", default=CANDIDATES,
                    help="comma-separated candidates; ':opts' are appended to the generator's name")
    ap.add_argument("--dpo-steps", type=int, default=3, help="champion: DPO steps (the demo trains 3)")
    ap.add_argument("--system", action="append", default=[], metavar="NAME=TEXT",
                    help="add or replace a system prompt usable as ':system=NAME' (repeatable)")
    args = ap.parse_args()

    cfg = load_config(args.config)
    work = Path(args.work)
    cfg = dataclasses.replace(cfg, project=work / "project")
    generator = cfg.generation.models[0]
    candidates = [generator + m if m.startswith(":") else m for m in args.members.split(",") if m]
    prompts = dict(cfg.scoring.system_prompts)
    for item in args.system:
        name, sep, text = item.partition("=")
        if not sep:
            ap.error(f"--system {item!r}: expected NAME=TEXT")
        prompts[name] = text
    scoring = dataclasses.replace(cfg.scoring, committee=[generator, *candidates], system_prompts=prompts)
    cfg = dataclasses.replace(cfg, scoring=scoring)
    rnd = Project(cfg.project).round(1, create=True)
    times = {}
    for name, step in (("pool", run_pool), ("generate", run_generate)):
        t0 = time.perf_counter()
        step(cfg, rnd, progress=True)
        times[name] = time.perf_counter() - t0
    if "champion" in candidates:
        from training.registry import registry_root

        if not (registry_root(cfg) / "index.json").is_file():
            train_champion(cfg, registry_root(cfg), args.dpo_steps, work)
    t0 = time.perf_counter()
    manifest = run_score(cfg, rnd, progress=True, force=True)  # another committee than a previous run's
    times["score"] = time.perf_counter() - t0
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    comps = read_rows(rnd.step("score").file("completion_scores.parquet"))
    gen_name = member_name(generator)
    print(f"\n{len({c['prompt_id'] for c in comps})} prompts, {len(comps)} completions; "
          f"committee {manifest['committee']}; reused {manifest['reused']}")
    base = compare(comps, gen_name, gen_name)
    print(f"generator alone: ref acc {base['ref acc']:.0%} (prefers the human-chosen answer)")
    print(f"{'candidate':<42} {'vote>0':>7} {'|Δlogprob|':>10} {'flips':>6} {'ref acc':>8} {'right|flip':>11}")
    for spec in candidates:
        name = member_name(spec)
        if f"logprob_mean::{name}" not in comps[0]:
            print(f"{name:<42} skipped ({'; '.join(manifest['committee_notes'])})")
            continue
        r = compare(comps, gen_name, name)
        right = f"{r['right when flipped']:.0%} of {r['flipped']}" if r["right when flipped"] is not None else "-"
        print(f"{name:<42} {r['vote>0']:>7.0%} {r['disagreement']:>10.3f} {r['flips']:>6.0%} {r['ref acc']:>8.0%} "
              f"{right:>11}")


if __name__ == "__main__":
    main()
