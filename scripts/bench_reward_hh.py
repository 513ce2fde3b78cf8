"""Quality bar for the reward model: LoRA RM on SmolLM2-135M-Instruct, HH-harmless, held-out pairwise accuracy.

    python scripts/bench_reward_hh.py                      # full run (~25-35 min on 2 shared CPU cores)
    python scripts/bench_reward_hh.py --train-pairs 64 --heldout 64 --model tiny-llama   # smoke run

Trains on data/hh-harmless-dev.jsonl.gz minus the held-out pairs (`training.data.split_heldout`: the first
`--heldout` pairs in hash order, and every pair sharing a prompt with them), scores the held-out pairs and prints
accuracy with a 95% bootstrap CI, training pairs/s, scoring pairs/s and wall time. Resumable: rerun with the same
--work folder after a kill and training continues from the last checkpoint. Target: ≥ 60% held-out accuracy
(published small reward models score 56-61% on HH harmless).
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
from preference.plumbing.io import write_json  # noqa: E402
from training.data import load_hh_pairs, split_heldout  # noqa: E402
from training.evaluate import EvalConfig, format_table, pairwise_report  # noqa: E402
from training.reward import RewardModel, RewardTrainConfig, train_reward_model  # noqa: E402


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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench-reward-hh", help="checkpoints + model + results.json")
    args = ap.parse_args()

    t0 = time.monotonic()
    pairs = load_hh_pairs(args.data)
    train, heldout = split_heldout(pairs, args.heldout)
    if args.train_pairs:
        train = train[: args.train_pairs]
    cfg = RewardTrainConfig(
        base_model=args.model, lora_r=args.rank, lora_alpha=2 * args.rank, learning_rate=args.lr, epochs=args.epochs,
        max_length=args.max_length, batch_size=args.batch_size, grad_accum=args.grad_accum, threads=args.threads,
    )
    work = Path(args.work)
    print(f"train {len(train)} pairs, held-out {len(heldout)} pairs, model {args.model}, work {work}", flush=True)
    stats = train_reward_model(train, cfg, work, seed=args.seed, progress=True)
    member = stats["members"][0]
    print(f"trained: {member['steps']} steps, {member['seconds']:.0f} s, {member['pairs_per_second']} pairs/s "
          f"(bf16={member['bf16']}, resumed from {member['resumed_from']})", flush=True)

    rm = RewardModel.load(work / "model", threads=args.threads)
    t1 = time.monotonic()
    chosen, rejected = rm.score_pairs(heldout, progress=True)
    score_s = time.monotonic() - t1
    report = pairwise_report(heldout, chosen, rejected, EvalConfig(heldout_size=args.heldout))
    rows = [("all", report)] + sorted(report["slices"].items())
    print(format_table(rows, f"held-out pairwise accuracy ({args.model}, LoRA r={args.rank})"))
    lo, hi = report["ci"]
    result = {
        "model": args.model, "train_pairs": len(train), "heldout_pairs": len(heldout), "config": vars(args),
        "accuracy": report["accuracy"], "ci95": [lo, hi], "slices": report["slices"],
        "train_pairs_per_second": member["pairs_per_second"], "train_seconds": member["seconds"],
        "score_pairs_per_second": round(len(heldout) / score_s, 2), "wall_seconds": round(time.monotonic() - t0, 1),
        "train_loss": member["train_loss"], "losses": member["losses"],
    }
    write_json(work / "results.json", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("slices", "losses", "config")}, indent=1))
    print(f"accuracy {report['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}); target ≥ 0.60: "
          f"{'met' if report['accuracy'] >= 0.60 else 'NOT met'}")


if __name__ == "__main__":
    main()
