"""Step `failures`: the round's pairs the reward model still orders wrongly, as pool prompts with source
"failure:round-N" → failures/prompts.parquet (read by the next round's pool step: error-based candidates)."""

from __future__ import annotations

from preference.plumbing.io import read_rows, write_rows
from preference.schema import PreferencePair, Prompt

FAILURE_REASON = "reward model prefers the rejected answer"


def failure_prompts(pairs: list[PreferencePair], scores: list[dict], round_number: int,
                    limit: int | None = None) -> list[Prompt]:
    """Pool prompts for the pairs the reward model orders wrongly (most wrong first, one per prompt)."""
    by_id = {p.id: p for p in pairs}
    wrong = sorted((s for s in scores if s["split"] == "train" and not s["correct"] and s["pair_id"] in by_id),
                   key=lambda s: s["chosen_reward"] - s["rejected_reward"])
    out, seen = [], set()
    for s in wrong:
        pair = by_id[s["pair_id"]]
        if pair.prompt_id in seen:
            continue
        seen.add(pair.prompt_id)
        margin = s["chosen_reward"] - s["rejected_reward"]
        out.append(Prompt(
            id=pair.prompt_id, messages=pair.prompt, slice=pair.slice, source=f"failure:round-{round_number}",
            metadata={"reason": FAILURE_REASON, "pair_id": pair.id, "reward_margin": f"{margin:.4f}",
                      "round": str(round_number)},
        ))
    return out[:limit] if limit is not None else out


def run_failures(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """The round's pairs the reward model still orders wrongly → failures/prompts.parquet (next round's pool)."""
    from training.data import load_round_pairs

    evaluate = rnd.step("evaluate")
    run = rnd.start_step("failures", {"max_failures": cfg.gate.max_failures}, inputs=(evaluate,),
                         seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step("failures").manifest()
    with run:
        scores = read_rows(evaluate.file("pair_scores.parquet"))
        prompts = failure_prompts(load_round_pairs(rnd), scores, rnd.number, cfg.gate.max_failures)
        write_rows(run.path / "prompts.parquet", [p.to_row() for p in prompts], schema=_prompt_schema() if not prompts else None)
        run.counts.update({"failures": len(prompts),
                           "train_pairs_scored": sum(1 for s in scores if s["split"] == "train")})
    return rnd.step("failures").manifest()


def _prompt_schema():
    """Arrow schema of Prompt rows (so an empty failures file still has the right columns)."""
    import pyarrow as pa

    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.schema([("id", pa.string()), ("messages", msg), ("slice", pa.string()), ("source", pa.string()),
                      ("metadata", pa.string())])


__all__ = ["FAILURE_REASON", "failure_prompts", "run_failures"]
