"""Round step `rewards`: the registry champion's reward model scores the round's completions.

Runs after `score` and before `select`. When the registry (`gate.registry`, default `<project>/registry`) has a
champion with a reward model, every completion of the round's `generate` step is scored as the conversation
prompt + answer by each ensemble member (`training.reward.RewardModel.member_rewards`; K members when the champion
was trained with `reward.ensemble: K`). Writes `rewards/completion_rewards.parquet`, one row per completion:

    completion_id (str), prompt_id (str), reward_mean (float, higher = better),
    reward_std (float, std ddof 0 across members; 0 for one model), reward::<k> (float) for each member k

and the manifest's `reward_model`: `{"version", "registry", "members"}`, or null when there is no champion with
a reward model (or `selection.reward_source: ensemble`); then the parquet has the columns and no rows.

Consumers: `select` (the `reward_margin` / `reward_disagreement` signals and the completion choice) and the
push step's Argilla suggestions. Scores are cached by model version: a sqlite table in `<project>/cache/` keyed by
the hash of the reward model's files and the conversation, so a rerun, a crash or the next round under the same
champion recomputes nothing already scored. The champion is not part of the step key (a promotion must not make a
finished round stale); `--force` rescores with the current champion.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_rows, sqlite_transaction, write_rows

OUTPUT = "completion_rewards.parquet"
CHUNK = 64  # conversations per model call between cache writes (the resume granularity)


def champion_reward_model(cfg) -> tuple[str, Path, Path] | None:
    """(version, registry root, reward model folder) of the registry's champion, or None when there is none or it
    has no reward model."""
    from training.registry import Registry, registry_root

    root = registry_root(cfg)
    if not (root / "index.json").is_file():
        return None
    registry = Registry(root)
    version = registry.champion()
    if version is None:
        return None
    folder = _reward_model(registry, version)
    return None if folder is None else (version, root, folder)


def _reward_model(registry, version: str) -> Path | None:
    """The reward model folder of registry `version` (the trainer table's reward-model artifact), or None."""
    from training.reward import MODEL_CARD

    folder = registry.artifact(version, "reward_model")
    return folder if folder is not None and (folder / MODEL_CARD).is_file() else None


def model_identity(folder: Path) -> str:
    """sha256 of a model folder's files (names and bytes): the cache key of "this reward model"."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_identity(folder: Path, dtype: str) -> str:
    """The reward cache's key of a model run at `dtype`: its files' sha256 and the dtype, so a project moved to a
    machine whose `auto` precision differs never mixes rewards of two precisions."""
    return f"{model_identity(folder)}-{dtype}"


class RewardCache:
    """Rewards by (model identity, conversation): `<project>/cache/rewards.sqlite`, JSON lists of K floats."""

    def __init__(self, path: Path, identity: str):
        self.path = Path(path)
        self.identity = identity
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS rewards (model TEXT NOT NULL, key TEXT NOT NULL, "
                       "members TEXT NOT NULL, PRIMARY KEY (model, key))")

    def _db(self):
        return sqlite_transaction(self.path)

    @staticmethod
    def key(conversation: list[dict]) -> str:
        return hashlib.sha256(json.dumps(conversation, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, keys: list[str]) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        with self._db() as db:
            for start in range(0, len(keys), 500):
                part = keys[start : start + 500]
                rows = db.execute(
                    f"SELECT key, members FROM rewards WHERE model = ? AND key IN ({', '.join('?' * len(part))})",
                    (self.identity, *part),
                )
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put(self, values: dict[str, list[float]]) -> None:
        with self._db() as db:
            db.executemany("INSERT OR REPLACE INTO rewards VALUES (?, ?, ?)",
                           [(self.identity, k, json.dumps(v)) for k, v in values.items()])


def schema(members: int) -> pa.Schema:
    fields = [pa.field("completion_id", pa.string()), pa.field("prompt_id", pa.string()),
              pa.field("reward_mean", pa.float64()), pa.field("reward_std", pa.float64())]
    return pa.schema(fields + [pa.field(f"reward::{k}", pa.float64()) for k in range(members)])


def score_completions(model, conversations: list[list[dict]], cache: RewardCache, *,
                      progress: bool = True) -> tuple[np.ndarray, int]:
    """(K, N) member rewards of the conversations, from the cache where present, else from `model` in chunks
    (each chunk cached as soon as it is scored). Returns (rewards, number computed now)."""
    from tqdm.auto import tqdm

    keys = [cache.key(c) for c in conversations]
    known = cache.get(list(dict.fromkeys(keys)))
    todo = list(dict.fromkeys(k for k in keys if k not in known))
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    bar = tqdm(total=len(todo), disable=not progress or not todo, desc="rewards (champion)", unit="answer")
    for start in range(0, len(todo), CHUNK):
        part = todo[start : start + CHUNK]
        scored = model.member_rewards([conversations[first[k]] for k in part])  # (K, len(part))
        fresh = {k: scored[:, j].tolist() for j, k in enumerate(part)}
        cache.put(fresh)
        known.update(fresh)
        bar.update(len(part))
    bar.close()
    out = np.array([known[k] for k in keys], dtype=np.float64).T if keys else np.zeros((len(model.members), 0))
    return out, len(todo)


def load_completion_rewards(rnd) -> tuple[list[str], list[str], np.ndarray] | None:
    """(completion ids, prompt ids, (K, C) member rewards) from a finished `rewards` step with rows, else None."""
    step = rnd.step("rewards")
    if not step.done or not step.manifest().get("reward_model"):
        return None
    rows = read_rows(step.file(OUTPUT))
    if not rows:
        return None
    members = sorted((c for c in rows[0] if c.startswith("reward::")), key=lambda c: int(c.split("::")[1]))
    rewards = np.array([[r[c] for r in rows] for c in members], dtype=np.float64)
    return [r["completion_id"] for r in rows], [r["prompt_id"] for r in rows], rewards


def run_rewards(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Score the round's completions with the champion reward model (see the module docstring)."""
    sel = cfg.selection
    generate, pool = rnd.step("generate"), rnd.step("pool")
    key = {"reward_source": sel.reward_source, "registry": str(_registry(cfg))}
    run = rnd.start_step("rewards", key, inputs=(pool, generate), seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step("rewards").manifest()
    with run:
        champion = None if sel.reward_source == "ensemble" else champion_reward_model(cfg)
        if champion is None:
            if sel.reward_source == "champion":
                raise CurateError(
                    f"selection.reward_source is 'champion' but the registry {_registry(cfg)} has no champion with "
                    "a reward model; run a round through `curate gate` first, or set selection.reward_source: auto"
                )
            write_rows(run.path / OUTPUT, [], schema=schema(0))
            run.extra["reward_model"] = None
            run.extra["note"] = ("selection.reward_source is 'ensemble': select uses the fast Bradley–Terry ensemble"
                                 if sel.reward_source == "ensemble" else
                                 "no champion reward model in the registry yet: select uses the fast ensemble")
            run.counts["completions"] = 0
        else:
            _score_round(cfg, rnd, run, champion, progress=progress)
    return rnd.step("rewards").manifest()


def _champion_scorer(cfg, folder: Path) -> tuple[_LazyModel, RewardCache, dict]:
    """(the reward model in `folder`, loaded on first use; its cache; the dtype and threads it runs with)."""
    from preference.plumbing.hardware import resolve_dtype, resolve_threads
    from training.reward import RewardModel

    dtype, threads = resolve_dtype("auto"), resolve_threads(None)
    cache = RewardCache(Path(cfg.project) / "cache" / "rewards.sqlite", cache_identity(folder, dtype))
    model = _LazyModel(lambda: RewardModel.load(folder, dtype=dtype, threads=threads), folder)
    return model, cache, {"dtype": dtype, "threads": threads}


def version_rewards(cfg, version: str, conversations: list[list[dict]]) -> list[float]:
    """Mean reward of each conversation under registry version `version`'s reward model, through the same cache
    as the step (the push step scores its gold records with the champion that scored the round)."""
    from training.registry import Registry

    registry = Registry(_registry(cfg))
    folder = _reward_model(registry, version)
    if folder is None:
        raise CurateError(f"registry version {version} in {registry.root} has no reward model (it scored this "
                          "round's rewards step); restore it, or redo the round's rewards step with --force")
    model, cache, _ = _champion_scorer(cfg, folder)
    rewards, _ = score_completions(model, conversations, cache, progress=False)
    return rewards.mean(axis=0).tolist()


def _score_round(cfg, rnd, run, champion: tuple[str, Path, Path], *, progress: bool) -> None:
    """The champion's rewards of every completion, streamed by chunks of prompts (`score.prompt_groups`: bounded
    memory) into the output file."""
    from tqdm.auto import tqdm

    from curation.steps.score import prompt_groups
    from preference.plumbing.io import RowWriter, count_rows

    version, root, folder = champion
    prompts_file = rnd.step("pool").file("prompts.parquet")
    completions_file = rnd.step("generate").file("completions.parquet")
    model, cache, hardware = _champion_scorer(cfg, folder)
    members = len(model.members)
    written = computed = 0
    bar = tqdm(total=count_rows(completions_file), disable=not progress, desc="rewards (champion)", unit="answer")
    try:
        with RowWriter(run.path / OUTPUT, schema(members)) as out:
            for prompts, completions in prompt_groups(prompts_file, completions_file):
                conversations = [[*prompts[c.prompt_id].messages, {"role": "assistant", "content": c.text}]
                                 for c in completions]
                rewards, fresh = score_completions(model, conversations, cache, progress=False)
                computed += fresh
                rows = []
                for j, c in enumerate(completions):
                    row = {"completion_id": c.id, "prompt_id": c.prompt_id, "reward_mean": float(rewards[:, j].mean()),
                           "reward_std": float(rewards[:, j].std())}
                    row.update({f"reward::{k}": float(rewards[k, j]) for k in range(len(rewards))})
                    rows.append(row)
                out.write(rows)
                written += len(rows)
                bar.update(len(rows))
    except CurateError as exc:
        if "not in the pool" in str(exc):
            raise CurateError(f"round {rnd.number}: {exc}; the generate step is stale") from exc
        raise
    finally:
        bar.close()
    run.extra["reward_model"] = {"version": version, "registry": str(root), "members": members}
    run.extra["reward_cache"] = {"model_sha256": cache.identity, "path": str(cache.path)}
    run.extra["hardware"] = hardware
    run.counts.update(completions=written, computed=computed, cached=written - computed)


class _LazyModel:
    """Loads the reward model on first use, so a run served entirely from the cache never loads it."""

    def __init__(self, load, folder: Path):
        from preference.plumbing.io import read_json
        from training.reward import MODEL_CARD

        self._load, self._model = load, None
        self.members = [f"member-{k}" for k in range(read_json(folder / MODEL_CARD)["members"])]

    def member_rewards(self, conversations: list) -> np.ndarray:
        if self._model is None:
            self._model = self._load()
        return self._model.member_rewards(conversations)


def _registry(cfg) -> Path:
    from training.registry import registry_root

    return registry_root(cfg)
