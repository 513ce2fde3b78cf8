"""Quality bar and speed of the reward model: LoRA RM on SmolLM2-135M-Instruct, HH-harmless, held-out accuracy.

    python scripts/bench_reward_hh.py                      # full run (~25-35 min on 2 shared CPU cores)
    python scripts/bench_reward_hh.py --train-pairs 64 --heldout 64 --model tiny-llama   # smoke run
    python scripts/bench_reward_hh.py --dtypes bfloat16,float32 --train-pairs 48 --heldout 48   # speed by dtype

Trains on data/hh-harmless-dev.jsonl.gz minus the held-out pairs (`training.data.split_heldout`: the first
`--heldout` pairs in hash order, and every pair sharing a prompt with them), scores the held-out pairs and prints
accuracy with a 95% bootstrap CI, training pairs/s, scoring pairs/s and wall time, each line with the hardware it
ran on (CPU features, dtype, threads). `--dtypes` runs training (bf16 autocast or fp32) and scoring (weights in
that dtype) once per dtype in the same run, so the two precisions are compared on the same machine and data;
`auto` is what the tool would choose here (`preference.plumbing.hardware.resolve_dtype`). Resumable: rerun with
the same --work folder after a kill and training continues from the last checkpoint. Target: ≥ 60% held-out
accuracy (published small reward models score 56-61% on HH harmless).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from preference.plumbing.env import apply_env_defaults  # noqa: E402

apply_env_defaults()  # before torch is imported
from preference.plumbing.hardware import DTYPES, describe, hardware_summary, resolve_dtype, resolve_threads  # noqa: E402
from preference.plumbing.io import write_json  # noqa: E402
from training.data import load_hh_pairs, split_heldout  # noqa: E402
from training.evaluate import EvalConfig, format_table, pairwise_report  # noqa: E402
from training.reward import RewardModel, RewardTrainConfig, train_reward_model  # noqa: E402


def run_dtype(dtype: str, train, heldout, args, threads: int) -> dict:
    """Train and score at one precision; every printed figure carries the hardware line."""
    hw = describe(hardware_summary(dtype, threads))
    cfg = RewardTrainConfig(
        base_model=args.model, lora_r=args.rank, lora_alpha=2 * args.rank, learning_rate=args.lr, epochs=args.epochs,
        max_length=args.max_length, batch_size=args.batch_size, grad_accum=args.grad_accum, threads=threads,
        bf16=dtype == "bfloat16", report_to=[],
    )
    work = Path(args.work) / dtype
    print(f"[{hw}] train {len(train)} pairs, held-out {len(heldout)} pairs, model {args.model}, work {work}",
          flush=True)
    stats = train_reward_model(train, cfg, work, seed=args.seed, progress=True)
    member = stats["members"][0]
    print(f"[{hw}] trained: {member['steps']} steps, {member['seconds']:.0f} s, {member['pairs_per_second']} "
          f"pairs/s (bf16 autocast={member['bf16']}, resumed from {member['resumed_from']})", flush=True)
    rm = RewardModel.load(work / "model", dtype=dtype, threads=threads)
    t1 = time.monotonic()
    chosen, rejected = rm.score_pairs(heldout, progress=True)
    score_s = time.monotonic() - t1
    report = pairwise_report(heldout, chosen, rejected, EvalConfig(heldout_size=args.heldout))
    rows = [("all", report)] + sorted(report["slices"].items())
    print(format_table(rows, f"[{hw}] held-out pairwise accuracy ({args.model}, LoRA r={args.rank})"))
    lo, hi = report["ci"]
    result = {
        "dtype": dtype, "hardware": hardware_summary(dtype, threads), "accuracy": report["accuracy"],
        "ci95": [lo, hi], "slices": report["slices"], "train_pairs_per_second": member["pairs_per_second"],
        "train_seconds": member["seconds"], "resumed_from": member["resumed_from"],
        "score_pairs_per_second": round(len(heldout) / score_s, 2), "train_loss": member["train_loss"],
        "losses": member["losses"],
    }
    print(f"[{hw}] scoring: {result['score_pairs_per_second']} pairs/s; accuracy {report['accuracy']:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}); target ≥ 0.60: {'met' if report['accuracy'] >= 0.60 else 'NOT met'}",
          flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "hh-harmless-dev.jsonl.gz"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--train-pairs", type=int, default=None, help="cap on training pairs (default: all)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    ap.add_argument("--dtypes", default="auto",
                    help="comma-separated precisions to train and score at, e.g. bfloat16,float32 (default: auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench-reward-hh", help="per dtype: checkpoints + model; results.json")
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: expected a comma-separated list of {', '.join(DTYPES)}, got {args.dtypes!r}")
    dtypes = list(dict.fromkeys(resolve_dtype(d) for d in dtypes))
    threads = resolve_threads(args.threads)

    t0 = time.monotonic()
    pairs = load_hh_pairs(args.data)
    train, heldout = split_heldout(pairs, args.heldout)
    if args.train_pairs:
        train = train[: args.train_pairs]
    results = [run_dtype(dtype, train, heldout, args, threads) for dtype in dtypes]
    summary = {"model": args.model, "train_pairs": len(train), "heldout_pairs": len(heldout), "config": vars(args),
               "results": results, "wall_seconds": round(time.monotonic() - t0, 1)}
    write_json(Path(args.work) / "results.json", summary)
    print(f"\n{'dtype':<9} {'train pairs/s':>13} {'score pairs/s':>13} {'accuracy':>9}  hardware")
    for r in results:
        print(f"{r['dtype']:<9} {r['train_pairs_per_second']!s:>13} {r['score_pairs_per_second']!s:>13} "
              f"{r['accuracy']:>9.3f}  {describe(r['hardware'])}")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"} | {
        "per_dtype": {r["dtype"]: {k: r[k] for k in ("train_pairs_per_second", "score_pairs_per_second", "accuracy")}
                      for r in results}}, indent=1, default=str))


if __name__ == "__main__":
    main()
