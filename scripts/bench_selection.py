"""Selection speed: k-center greedy and the hybrid strategy over a large pool (target: < 5 s each).

    python scripts/bench_selection.py                 # 100k items × 384-dim embeddings, k = 100
    python scripts/bench_selection.py --n 20000 --k 500

Embeddings are random mixtures of Gaussian clusters (float32); 1,000 items count as already labelled, so the
k-center distances start from a real labelled set. Prints wall time per strategy (numpy, one BLAS thread when
OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from curation.acquisition.strategies import (  # noqa: E402
    DropNearDuplicates,
    Items,
    KCenterGreedy,
    Random,
    build_strategy,
)


def make_pool(n: int, dim: int, n_labelled: int, seed: int) -> Items:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, dim)).astype(np.float32) * 3
    x = centers[rng.integers(0, 64, n)] + rng.normal(size=(n, dim)).astype(np.float32)
    labelled = centers[rng.integers(0, 64, n_labelled)] + rng.normal(size=(n_labelled, dim)).astype(np.float32)
    signals = {
        "mean_entropy": rng.gamma(2.0, 1.0, n),
        "mean_logprob": -rng.gamma(2.0, 1.0, n),
        "semantic_spread": rng.random(n),
    }
    return Items(ids=np.arange(n), signals=signals, embeddings=x, slices=None, labelled=labelled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="pool size")
    ap.add_argument("--dim", type=int, default=384, help="embedding dimension")
    ap.add_argument("--k", type=int, default=100, help="items to select")
    ap.add_argument("--labelled", type=int, default=1000, help="already-labelled items (k-center context)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    items = make_pool(args.n, args.dim, args.labelled, args.seed)
    print(f"pool: {args.n:,} items × {args.dim} dims, {args.labelled:,} labelled (built in "
          f"{time.perf_counter() - t0:.2f} s); selecting k={args.k}")
    weights = {"entropy": 1.0, "low_logprob": 1.0, "semantic_spread": 1.0}
    cases = [
        ("random", Random()),
        ("kcenter (k-center greedy over the whole pool)", KCenterGreedy()),
        ("hybrid (weighted top-4k, then k-center)", build_strategy("hybrid", weights=weights)),
        ("hybrid + near-duplicate filter (cos ≥ 0.98)",
         DropNearDuplicates(build_strategy("hybrid", weights=weights), 0.98)),
    ]
    for name, strategy in cases:
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        picks = strategy.select(items, args.k, rng)
        seconds = time.perf_counter() - t0
        verdict = "OK" if seconds < 5.0 else "SLOW (target < 5 s)"
        print(f"  {name:<50} {seconds:6.2f} s  picks={len(picks)}  {verdict}")


if __name__ == "__main__":
    main()
