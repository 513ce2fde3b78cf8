"""Simulated users for a served champion: send prompts from a file, rate some answers thumbs up or down.

    export CURATE_API_KEY=...        # the key `curate serve` was started with (serve.api_key_env)
    python scripts/simulate_users.py -c configs/production-loop.yaml --prompts data/hh-harmless-sample.jsonl.gz --n 40
    python scripts/simulate_users.py -c configs/production-loop.yaml --prompts data/moderation-dev.jsonl.gz \\
        --n 60 --slice moderation      # traffic that drifts away from what the champion was trained on

Prompts: any pool file (`curation.steps.pool` formats: jsonl `{"prompt"}`/`{"messages"}`, HH transcripts, parquet, …),
`--n` drawn at random (seeded), each sent as a chat request with `metadata.slice` (`--slice`, else the prompt's).
Ratings: a user rates an answer with probability `--rate-share`; the rating comes from a labelled preference set
(`--labels`, default the HH-harmless dev pairs): the answer is "up" when the text oracle trained on the set
(`preference.simulated.TextOracle`) scores it at least the median of the set's own answers and the harm rules flag
nothing, else "down". Prints one JSON line of counts. Importable: `simulate(...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class SimulatedUsers:
    """Thumbs up/down from a labelled preference set (see the module docstring)."""

    def __init__(self, labels: Path, seed: int = 0):
        from preference.simulated import SimulatedAnnotator, SimulatedConfig, load_labelled

        self.annotator = SimulatedAnnotator(SimulatedConfig(source=Path(labels), seed=seed))
        pairs = load_labelled(Path(labels))
        answers = [p[1] for p in pairs] + [p[2] for p in pairs]
        self.threshold = float(np.median(self.annotator.oracle.score(answers)))

    def rate(self, answer: str) -> str:
        if not answer.strip() or self.annotator.harm_labels(answer):
            return "down"
        return "up" if float(self.annotator.oracle.score([answer])[0]) >= self.threshold else "down"


def load_prompts(path: Path, n: int, seed: int):
    """`n` prompts drawn (seeded) from any pool source file."""
    from curation.steps.pool import PoolSource, read_source

    prompts, _, _ = read_source(PoolSource(path=Path(path)), strict=False, max_chars=8000)
    if not prompts:
        raise SystemExit(f"error: {path} holds no usable prompts")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(prompts), size=min(n, len(prompts)), replace=False)
    return [prompts[i] for i in picks]


def simulate(url: str, key: str, prompts, users: SimulatedUsers, *, slice_name: str | None = None,
             rate_share: float = 0.6, max_tokens: int = 64, seed: int = 0, timeout: float = 300.0) -> dict:
    """Send each prompt, rate some answers; returns counts and the response ids."""
    import httpx

    rng = np.random.default_rng([seed, 1])
    counts = {"sent": 0, "answered": 0, "failed": 0, "up": 0, "down": 0}
    ids = []
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        for p in prompts:
            counts["sent"] += 1
            body = {"messages": p.messages, "max_tokens": max_tokens, "temperature": 0.8,
                    "metadata": {"slice": slice_name or p.slice}}
            resp = client.post("/chat/completions", json=body)
            if resp.status_code != 200:
                counts["failed"] += 1
                continue
            data = resp.json()
            counts["answered"] += 1
            ids.append(data["id"])
            if rng.random() < rate_share:
                rating = users.rate(data["choices"][0]["message"]["content"] or "")
                fb = client.post("/feedback", json={"response_id": data["id"], "rating": rating})
                fb.raise_for_status()
                counts[rating] += 1
    return {**counts, "response_ids": ids}


def main(argv: list[str] | None = None) -> int:
    from preference.plumbing.env import apply_env_defaults

    apply_env_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, required=True, help="the round config `curate serve` used")
    parser.add_argument("--prompts", type=Path, required=True, help="pool file to draw prompts from")
    parser.add_argument("--n", type=int, default=40, help="prompts to send")
    parser.add_argument("--slice", help="metadata.slice of every request (default: each prompt's slice)")
    parser.add_argument("--labels", type=Path, default=ROOT / "data" / "hh-harmless-dev.jsonl.gz",
                        help="labelled preference pairs the users judge by")
    parser.add_argument("--rate-share", type=float, default=0.6, help="share of answers users rate")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from curation.config import load_config
    from curation.serving.serve import api_key, status
    from preference.plumbing.errors import CurateError

    try:
        cfg = load_config(args.config)
        info = status(cfg)
        if not info["ready"]:
            raise CurateError(f"nothing serves {args.config} (`curate serve -c {args.config}` first)")
        key = api_key(cfg)
    except CurateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    users = SimulatedUsers(args.labels, seed=args.seed)
    prompts = load_prompts(args.prompts, args.n, args.seed)
    out = simulate(info["url"], key, prompts, users, slice_name=args.slice, rate_share=args.rate_share,
                   max_tokens=args.max_tokens, seed=args.seed)
    out.pop("response_ids")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
