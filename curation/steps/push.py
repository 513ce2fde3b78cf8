"""Step `push`: send the selected items to reviewers (Argilla or simulated); the annotation section's config.

select/selected.parquet + the round's prompts + generate/completions.parquet (+ score/prompt_scores.parquet
for embeddings, + rewards/completion_rewards.parquet for suggestions) → `AnnotationRecord`s, one per selected
prompt. Its completions: the selection's `completion_ids` (in that display order) when the select step chose
them, else up to `completions_per_record` round-robin over the models, shown in a seeded per-record random
order so position says nothing. With `gold`, known-answer records from a labelled set are mixed into the
queue at seeded positions (they look like any other record to reviewers; their answers measure the reviewers
and never become training pairs). Saved to `push/records.jsonl`. Backend `argilla`: the dataset is created
or reused (guidelines and distribution synced in place; other setting changes need `--new-version`), records
upserted by id (answered ones untouched; a rerun after a crash resumes), and the champion reward model's
ranking (the round's `rewards` step) is each record's suggestion (agent = the registry version). Backend
`simulated`: nothing else to do.

Step identity: the push step's key is a hash of the annotation section without its operational fields
(`OPERATIONAL` metadata: url, env names, timeouts, retries, polling, batch size) and without the sections only
the pull reads (`PULL_ONLY`), plus the dataset settings the config puts on the server. A changed setting makes
the push stale (`--force` re-pushes and syncs); an operational change does not.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from preference.aggregate import (
    AggregationConfig,
)
from preference.agreement import (
    ReviewConfig,
)
from preference.argilla import (
    QUEUE,
    ArgillaClient,
    ArgillaConfig,
    annotation_spec,
    ensure_dataset,
    latest_version,
    queue_url,
    review_spec,
    upsert_records,
    versioned,
)
from preference.plumbing.config import to_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl, read_rows, write_jsonl
from preference.schema import AnnotationRecord, Completion, Prompt, stable_id
from preference.simulated import SimulatedConfig, load_labelled

KNOWN_SELECT_COLUMNS = {"prompt_id", "slice", "arm", "strategy", "score", "rank", "reason", "embedding",
                        "completion_ids"}
PULL_ONLY = {"pull_only": True}  # field metadata: read by the pull step only, not part of the push's identity
GOLD_CHOSEN, GOLD_REJECTED = "gold:chosen", "gold:rejected"  # model names of gold completions (never shown)


@dataclass
class GoldConfig:
    """Known-answer records mixed into the queue to measure reviewers (never used as training pairs)."""

    source: Path = Path("data/hh-harmless-dev.jsonl.gz")  # labelled pairs: HH transcripts or {prompt,chosen,rejected}
    share: float = 0.1  # share of the queue that is gold

    def __post_init__(self):
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"gold.share must be in (0, 1) (share of the queue), got {self.share}")


@dataclass
class AnnotationConfig:
    backend: Literal["simulated", "argilla"] = "simulated"
    completions_per_record: int = 4  # k: completion slots per record (the dataset's layout; fixed per round)
    models: list[str] = field(default_factory=list)  # only completions of these models (empty = all)
    shuffle: bool = True  # show a record's completions in a seeded random order (no position bias)
    gold: GoldConfig | None = None  # known-answer records mixed into the queue
    # backend argilla only: simulated reviewers (from `simulated:`) answer through the real server's API before
    # each pull, as users of their own — for unattended demos and end-to-end tests of the Argilla path.
    simulate_reviewers: bool = field(default=False, metadata=PULL_ONLY)
    argilla: ArgillaConfig = field(default_factory=ArgillaConfig)
    simulated: SimulatedConfig = field(default_factory=SimulatedConfig, metadata=PULL_ONLY)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig, metadata=PULL_ONLY)
    review: ReviewConfig = field(default_factory=ReviewConfig, metadata=PULL_ONLY)

    def __post_init__(self):
        if not 2 <= self.completions_per_record <= 16:
            raise ValueError(f"completions_per_record must be in 2..16, got {self.completions_per_record}")


# ---------------------------------------------------------------------------------------------------------------
# step identity


def push_key(ann: AnnotationConfig) -> dict:
    """What the push step's result depends on: the annotation settings and the dataset settings they produce."""
    out = {"annotation": to_dict(ann, skip=("operational", "pull_only"))}
    if ann.backend != "argilla":
        del out["annotation"]["argilla"]  # the simulated backend pushes nothing to a server
    else:
        spec = annotation_spec(ann.argilla, ann.completions_per_record)
        out["dataset_settings"] = {k: spec[k] for k in ("guidelines", "min_submitted", "fields", "questions")}
    return out


def pull_key(ann: AnnotationConfig) -> dict:
    return {"annotation": to_dict(ann, skip=("operational",)),
            "review_settings": review_spec(ann.argilla, ann.completions_per_record)["questions"]
            if ann.backend == "argilla" else None}


# ---------------------------------------------------------------------------------------------------------------
# building records


def _pick_completions(comps: list[Completion], k: int, rng: np.random.Generator | None) -> list[Completion]:
    """Up to k completions, round-robin over models (sorted), samples in order; then shuffled if `rng`."""
    per_model: dict[str, list[Completion]] = defaultdict(list)
    for c in sorted(comps, key=lambda c: (c.model, c.sample_index, c.id)):
        per_model[c.model].append(c)
    picked: list[Completion] = []
    seen_texts: set[str] = set()
    queues = [per_model[m] for m in sorted(per_model)]
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                c = q.pop(0)
                if c.text.strip() not in seen_texts:  # identical answers cannot be ranked against each other
                    seen_texts.add(c.text.strip())
                    picked.append(c)
    if rng is not None:
        picked = [picked[i] for i in rng.permutation(len(picked))]
    return picked


def load_rewards(rnd) -> tuple[dict[str, float], str | None]:
    """The champion reward model's scores of this round's completions (the `rewards` step, contract 2):
    completion id → reward_mean, and the registry version that scored them (None: no step or no champion)."""
    step = rnd.step("rewards")
    if not step.done:
        return {}, None
    info = step.manifest().get("reward_model")
    if not info:
        return {}, None
    rows = read_rows(step.file("completion_rewards.parquet"))
    rewards = {str(r["completion_id"]): float(r["reward_mean"]) for r in rows
               if r.get("reward_mean") is not None and np.isfinite(r["reward_mean"])}
    return rewards, str(info["version"])


def build_records(cfg, rnd) -> tuple[list[AnnotationRecord], dict[str, float], str, dict[str, int]]:
    """The round's annotation records (selection order, gold mixed in), rewards by completion id, the reward
    agent (registry version), counts."""
    from curation.steps.pool import load_prompts

    ann: AnnotationConfig = cfg.annotation
    selected = read_rows(rnd.step("select").file("selected.parquet"))
    prompts = {p.id: p for p in load_prompts(rnd)}
    comp_rows = read_rows(rnd.step("generate").file("completions.parquet"))
    embeddings: dict[str, list[float]] = {}
    if rnd.step("score").done and (rnd.step("score").path / "prompt_scores.parquet").is_file():
        for row in read_rows(rnd.step("score").file("prompt_scores.parquet")):
            if row.get("embedding") is not None:
                embeddings[row["prompt_id"]] = row["embedding"]
    by_prompt: dict[str, list[Completion]] = defaultdict(list)
    by_id: dict[str, Completion] = {}
    for row in comp_rows:
        c = Completion.from_row(row)
        by_id[c.id] = c
        if ann.models and c.model not in ann.models:
            continue
        by_prompt[c.prompt_id].append(c)
    rewards, agent = load_rewards(rnd)
    missing = [r["prompt_id"] for r in selected if r["prompt_id"] not in prompts]
    if missing:
        raise CurateError(
            f"round {rnd.number}: {len(missing)} selected prompt(s) are not in the round's pool (e.g. {missing[0]}); "
            "the select step is stale: rerun `curate select --force`"
        )
    records, few = [], 0
    for row in sorted(selected, key=lambda r: (r.get("rank") if r.get("rank") is not None else 1 << 30,
                                                -(r.get("score") or 0.0), r["prompt_id"])):
        pid = row["prompt_id"]
        chosen = row.get("completion_ids")
        if chosen is not None and len(chosen):  # the select step chose the completions and their order
            unknown = [cid for cid in chosen if cid not in by_id]
            if unknown or len(chosen) > ann.completions_per_record:
                raise CurateError(
                    f"select/selected.parquet gives prompt {pid} the completions {list(chosen)[:6]}: "
                    + (f"{unknown[0]} is not in generate/completions.parquet" if unknown else
                       f"{len(chosen)} > annotation.completions_per_record ({ann.completions_per_record})")
                    + "; rerun `curate select --force` (or raise annotation.completions_per_record)")
            comps = [by_id[cid] for cid in chosen]
        else:
            rng = np.random.default_rng([cfg.seed, int(stable_id(pid, length=12), 16)]) if ann.shuffle else None
            comps = _pick_completions(by_prompt.get(pid, []), ann.completions_per_record, rng)
        if len(comps) < 2:
            few += 1
            continue
        meta: dict[str, Any] = {k: row.get(k) for k in ("score", "rank", "strategy", "arm", "reason")}
        meta["slice"] = row.get("slice") or prompts[pid].slice
        for key, value in row.items():
            if key not in KNOWN_SELECT_COLUMNS and isinstance(value, (int, float)) and not isinstance(value, bool):
                meta[key] = float(value)
        vector = row.get("embedding") if row.get("embedding") is not None else embeddings.get(pid)
        records.append(AnnotationRecord(prompt=prompts[pid], completions=comps, metadata=meta,
                                        vector=[float(x) for x in vector] if vector is not None else None))
    counts = {"selected": len(selected), "skipped_fewer_than_2_completions": few, "gold": 0}
    if ann.gold is not None and records:
        records, counts["gold"] = mix_gold(records, ann.gold, prompts, seed=cfg.seed, round_number=rnd.number)
    for position, record in enumerate(records, 1):  # the reviewers' queue: acquisition priority, gold spread in
        record.metadata[QUEUE] = position
        if agent is not None and counts["gold"]:  # gold records get the champion's suggestion too: no tell
            from curation.steps.rewards import version_rewards

            gold = [(c.id, [*r.prompt.messages, {"role": "assistant", "content": c.text}])
                    for r in records if "gold" in r.metadata for c in r.completions]
            ids, conversations = zip(*gold, strict=True)
            rewards = {**rewards, **dict(zip(ids, version_rewards(cfg, agent, list(conversations)), strict=True))}
    return records, rewards, agent or "reward-model", counts


def mix_gold(records: list[AnnotationRecord], gold, pool: dict[str, Prompt], *, seed: int,
             round_number: int) -> tuple[list[AnnotationRecord], int]:
    """`records` with gold records (known chosen > rejected) at seeded positions; they share the prompts' id
    scheme and completion id scheme, so nothing tells them apart in the reviewers' queue."""
    real = [r for r in records if "gold" not in r.metadata]
    n = max(1, round(gold.share * len(real) / (1.0 - gold.share)))
    pool_texts = {p.text.strip() for p in pool.values()}
    candidates = []
    for messages, chosen, rejected in load_labelled(gold.source, key="annotation.gold.source"):
        pid = stable_id(messages, prefix="p")  # the pool's id scheme (curation/steps/pool.py)
        prompt = Prompt(id=pid, messages=messages, slice="default", source=f"gold:{Path(gold.source).name}")
        if pid not in pool and prompt.text.strip() not in pool_texts:
            candidates.append((prompt, chosen, rejected))
    if len(candidates) < n:
        raise CurateError(
            f"annotation.gold: {gold.source} has {len(candidates)} labelled pairs whose prompts are not in this round's "
            f"pool, the queue needs {n} (share {gold.share} of {len(real)} records); point annotation.gold.source at "
            "a larger labelled set (HH transcripts or {prompt, chosen, rejected} rows) or lower annotation.gold.share"
        )
    rng = np.random.default_rng([seed, round_number, 0x601D])
    golds = []
    for i in sorted(rng.choice(len(candidates), size=n, replace=False)):
        prompt, chosen, rejected = candidates[i]
        comps = [Completion(id=Completion.make_id(prompt.id, model, 0, "gold"), prompt_id=prompt.id, model=model,
                            text=text) for model, text in ((GOLD_CHOSEN, chosen), (GOLD_REJECTED, rejected))]
        comps = [comps[j] for j in rng.permutation(2)]
        golds.append(AnnotationRecord(prompt=prompt, completions=comps, metadata={"gold": {
            "chosen": comps[[c.model for c in comps].index(GOLD_CHOSEN)].id,
            "rejected": comps[[c.model for c in comps].index(GOLD_REJECTED)].id, "source": str(gold.source)}}))
    return spread(real, golds, rng), n


def spread(records: list, extra: list, rng: np.random.Generator) -> list:
    """`records` with `extra` spread through them: the queue of len(records) + len(extra) positions is cut into
    len(extra) equal stretches and each extra item goes to a seeded random position of its own stretch, so a
    reviewer who answers any sizeable part of the queue meets some of them (and never a run of them)."""
    total, n = len(records) + len(extra), len(extra)
    if not n:
        return list(records)
    at = {int(j * total / n + rng.random() * total / n): item for j, item in enumerate(extra)}
    rest = iter(records)
    return [at[i] if i in at else next(rest) for i in range(total)]


def gold_ids(records: list[AnnotationRecord]) -> set[str]:
    return {r.record_id for r in records if isinstance(r.metadata.get("gold"), dict)}


def record_to_row(record: AnnotationRecord) -> dict:
    return {"record_id": record.record_id, "prompt": record.prompt.to_row(),
            "completions": [c.to_row() for c in record.completions], "metadata": record.metadata,
            "vector": record.vector}


def record_from_row(row: dict) -> AnnotationRecord:
    return AnnotationRecord(prompt=Prompt.from_row(row["prompt"]),
                            completions=[Completion.from_row(c) for c in row["completions"]],
                            metadata=row.get("metadata") or {}, vector=row.get("vector"))


def load_records(rnd) -> list[AnnotationRecord]:
    """The records a finished push step sent to reviewers, in push order."""
    return [record_from_row(r) for r in read_jsonl(rnd.step("push").file("records.jsonl"))]


def _signal_columns(records: list[AnnotationRecord]) -> list[str]:
    known = {"score", "rank", "strategy", "arm", "reason", "slice", QUEUE}
    return sorted({k for r in records for k, v in r.metadata.items() if k not in known and isinstance(v, float)})


def dataset_name(template: str, cfg, rnd, **extra) -> str:
    try:
        return template.format(project=Path(cfg.project).name, round=rnd.number, **extra)
    except (KeyError, IndexError, ValueError) as exc:
        raise CurateError(
            f"annotation.argilla dataset name template {template!r} is invalid ({exc}); use the fields "
            "{project} and {round}, e.g. '{project}-r{round:04d}'"
        ) from exc


def _spec(ann: AnnotationConfig, records: list[AnnotationRecord]) -> dict:
    dims = {len(r.vector) for r in records if r.vector is not None}
    if len(dims) > 1:
        raise CurateError(f"prompt embeddings have different lengths {sorted(dims)}; rerun `curate score --force`")
    return annotation_spec(ann.argilla, ann.completions_per_record, terms=("strategy", "arm", "slice"),
                           floats=("score", *_signal_columns(records)), ints=("rank", QUEUE),
                           vector_dim=dims.pop() if dims else None)


# ---------------------------------------------------------------------------------------------------------------
# push


def run_push(cfg, rnd, *, force: bool = False, progress: bool = True, new_version: bool = False) -> dict:
    """The push step. `new_version`: push to the next version of the round's dataset (`<name>-v2`, …), for
    setting changes Argilla cannot apply to a published dataset (questions, labels, fields)."""
    ann: AnnotationConfig = cfg.annotation
    inputs = [rnd.step("pool"), rnd.step("generate"), rnd.step("select")]
    inputs += [rnd.step(s) for s in ("score", "rewards") if rnd.step(s).done]
    run = rnd.start_step("push", push_key(ann), inputs=tuple(inputs), seeds={"seed": cfg.seed},
                         force=force or new_version)
    if run is None:
        return rnd.step("push").manifest()
    with run:
        records, rewards, agent, counts = build_records(cfg, rnd)
        if not records:
            raise CurateError(
                f"round {rnd.number}: none of the {counts['selected']} selected prompts has 2 or more distinct "
                "completions to rank; check the generate step (generation.n) and annotation.models"
            )
        write_jsonl(run.path / "records.jsonl", [record_to_row(r) for r in records])
        run.counts.update(counts, records=len(records), with_suggestions=sum(
            len(r.completions) >= 2 and all(c.id in rewards for c in r.completions) for r in records))
        run.extra["reward_model"] = agent if rewards else None
        if ann.backend == "argilla":
            a = ann.argilla
            base = dataset_name(a.dataset, cfg, rnd)
            spec = _spec(ann, records)
            with ArgillaClient.from_config(a) as client:
                version = max(1, latest_version(client, base, a.workspace) + (1 if new_version else 0))
                name = versioned(base, version)
                sync = ensure_dataset(client, name, a.workspace, spec, next_version=versioned(base, version + 1))
                run.counts.update(upsert_records(client, sync.dataset, spec, records, questions=a.questions(),
                                                 rewards=rewards, agent=agent, batch_size=a.batch_size,
                                                 progress=progress))
            run.counts["settings_synced"] = len(sync.updated)
            run.extra["argilla"] = {"url": client.url, "workspace": a.workspace, "dataset": name,
                                    "dataset_id": sync.id, "version": version,
                                    "queue_url": queue_url(client.url, sync.id),
                                    "previous": [versioned(base, v) for v in range(1, version)],
                                    "created": sync.created, "settings_updated": sync.updated}
            if progress and sync.updated:
                print(f"push: dataset {name!r} settings updated in place: {', '.join(sync.updated)}", flush=True)
    return rnd.step("push").manifest()


# ---------------------------------------------------------------------------------------------------------------
# pull


__all__ = ["AnnotationConfig", "GoldConfig", "build_records", "load_records", "load_rewards",
           "pull_key", "push_key", "run_push"]
