"""`curate generate`: n sampled completions per prompt from one or more generator models.

For every prompt of the round's pool and every model in `generation.models`, the prompt is rendered with the
model's chat template and `n` completions are sampled (`temperature`, `top_p`, `max_tokens`, per-prompt seeds
derived from `seed`). Output: `generate/completions.parquet`, rows of `preference.schema.Completion` with the
generator's mean token logprob (higher = more confident), an entropy proxy (exact mean next-token entropy on the
transformers backend; -mean logprob of the sampled tokens on vLLM), `num_tokens` and `finish_reason`.

Policies (stated, and counted in the manifest):
- Empty prompts (no token after rendering, or user turns that are only whitespace) are REJECTED: skipped,
  listed in `generate/rejected.jsonl` with the reason, counted as `rejected_empty`. The step does not fail.
- Prompts too long for the model (prompt tokens + `max_tokens` > `max_model_len`): `prompt_too_long: reject`
  (default) skips them the same way (`rejected_too_long`); `truncate` keeps the LAST
  `max_model_len - max_tokens` tokens (the most recent turns and the assistant opener survive; the start of the
  conversation is cut) and counts them as `truncated`.
- `include_references: true` also adds the prompt's `metadata.reference_chosen` / `reference_rejected` answers
  (HH pools) as completions with model `reference:chosen` / `reference:rejected`, scored (mean logprob) under
  the first generator model in the same backend call as the shard's generation (`Backend.generate_and_score`:
  on vLLM each prompt's context is computed once for its samples and its references); finish_reason
  `reference`; and a traffic pool's `metadata.served_completion` (the answer users were served) as a completion
  of model `served`.

The models run on `backend` (`BackendSettings`: `name` from `curation.backends.BACKENDS`, `dtype`, `threads`,
`max_model_len`, ...). The step prints the hardware and the precision it chose (one line), and records in its
manifest `hardware` (CPU features, dtype, threads), `generators` (per model: backend, weights+dtype
fingerprint, context length; `curate score` reuses a generator's logprobs only under the same fingerprint) and
`timings` (seconds per model: model load / engine start, generation, reference scoring).

Resumable: prompts are processed in shards of `batch_size` prompts, each written to the step's `parts/` as soon
as it is done; a rerun after a crash reuses finished shards. Cached: each (backend, model weights and dtype,
rendered prompt, sampling params, seed) result is stored in `cache_dir` (default `$CURATE_CACHE/generations`),
so an identical request in a later round or run is not recomputed, and outputs of different dtypes never mix.

Scale-out: `backend.tensor_parallel_size` / `backend.data_parallel_size` go to vLLM as they are (several GPUs of
one node).
`sharding: {backend: ray, num_shards: N, address: auto, num_gpus_per_shard: 1}` splits the pool into N shards and
generates each as a Ray task on the cluster (each task loads its own backend on its node; parts and cache folders
must then be on a filesystem every node sees). The output is identical to an unsharded run: seeds are per prompt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from curation.backends import (
    Backend,
    BackendSettings,
    Generation,
    Sampling,
    announce_hardware,
    check_runs_models,
    check_sampling,
    fit_request,
    format_timings,
    load_backend,
)
from curation.sharded import ShardingConfig, map_shards
from preference.plumbing.config import config_hash, from_dict, to_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, read_rows, write_json, write_rows
from preference.schema import Completion, Prompt, stable_id

# model name → prompt metadata key of a known answer that joins the candidates (`include_references: true`):
# HH reference answers, and the answer a served model gave (traffic pools, see curation.serving.traffic)
REFERENCE_KEYS = {"reference:chosen": "reference_chosen", "reference:rejected": "reference_rejected",
                  "served": "served_completion"}


@dataclass
class GenerationConfig:
    backend: BackendSettings = field(default_factory=BackendSettings)  # which backend and how it runs the models
    models: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])  # built-in names or HF folders
    n: int = 4  # completions per prompt and model
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.95
    max_tokens: int = 128  # new tokens per completion
    seed: int = 0
    batch_size: int = 64  # prompts per backend call and per resumable shard (larger batches decode faster)
    include_references: bool = False
    prompt_too_long: Literal["truncate", "reject"] = "reject"
    cache: bool = True
    cache_dir: Path | None = None  # None = $CURATE_CACHE/generations
    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # Ray: generate pool shards on a cluster

    def __post_init__(self):
        if isinstance(self.backend, str):  # Python shorthand: backend="dummy"
            self.backend = BackendSettings(name=self.backend)
        check_runs_models(self.backend)
        check_sampling(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                       seed=self.seed)
        if not self.models:
            raise ValueError("models is empty; list at least one generator, e.g. [smollm2-135m-instruct]")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        limit = self.backend.max_model_len
        if limit is not None and limit <= self.max_tokens:
            raise ValueError(f"max_model_len ({limit}) must be larger than max_tokens ({self.max_tokens})")

    @property
    def sampling(self) -> Sampling:
        return Sampling(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                        seed=self.seed)


# -------------------------------------------------------------------------------------------------- cache
class GenerationCache:
    """One JSON file per (backend, model weights, prompt tokens, sampling params incl. seed)."""

    def __init__(self, root: Path | None):
        self.root = root
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(backend: Backend, prompt_ids: list[int], sampling: Sampling) -> str:
        return stable_id(backend.kind, backend.fingerprint(), prompt_ids, sampling.key(), length=32)

    def _path(self, key: str) -> Path | None:
        return self.root / key[:2] / f"{key}.json" if self.root is not None else None

    def get(self, key: str) -> list[Generation] | None:
        path = self._path(key)
        if path is None or not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return [Generation.from_json(g) for g in read_json(path)]

    def put(self, key: str, gens: list[Generation]) -> None:
        path = self._path(key)
        if path is not None:
            write_json(path, [g.to_json() for g in gens])


def default_cache_dir() -> Path:
    from training.models import cache_dir

    return cache_dir() / "generations"


# ------------------------------------------------------------------------------------------------ helpers
def prepare_prompt(backend: Backend, prompt: Prompt, cfg: GenerationConfig) -> tuple[list[int] | None, str]:
    """(token ids, "") or (None, reason) for a prompt, applying the empty / too-long policies."""
    if not any(m["content"].strip() for m in prompt.messages if m["role"] == "user"):
        return None, "empty"
    ids = backend.encode(backend.render_chat(prompt.messages))
    if not ids:
        return None, "empty"
    budget = backend.max_model_len - cfg.max_tokens
    if budget < 1:
        raise CurateError(
            f"generation.max_tokens={cfg.max_tokens} leaves no room for a prompt in the model context of "
            f"{backend.max_model_len} tokens; lower max_tokens or raise max_model_len"
        )
    if len(ids) > budget:
        if cfg.prompt_too_long == "reject":
            return None, "too_long"
        return ids[-budget:], "truncated"
    return ids, ""


def completion_row(prompt: Prompt, model: str, index: int, gen: Generation, params_key: str) -> dict:
    mean_logprob = gen.mean_logprob
    entropy = gen.entropy if gen.entropy is not None else -mean_logprob
    return {  # Completion(...).to_row(), without dataclasses.asdict's deep copy (a hot path at scale)
        "id": Completion.make_id(prompt.id, model, index, params_key), "prompt_id": prompt.id, "model": model,
        "text": gen.text, "sample_index": index, "num_tokens": len(gen.token_ids), "mean_logprob": mean_logprob,
        "entropy": float(entropy), "finish_reason": gen.finish_reason, "seed": gen.seed,
    }


def _shard_path(parts: Path, kind: str, model: str, prompt_ids: list[str], params_key: str) -> Path:
    return parts / f"{kind}-{stable_id(model, prompt_ids, params_key, length=20)}.parquet"


def generate_chunk(
    backend: Backend, model: str, chunk: list[Prompt], cfg: GenerationConfig, parts: Path, cache: GenerationCache,
    stats: dict, rejected: list[dict], references: bool = False,
) -> tuple[list[dict], list[dict]]:
    """(completion rows, reference rows) of one model for one shard of prompts. The shard's results are written
    to `parts/` first, and a finished shard is read back instead of recomputed (resumable); with `references`,
    the reference answers are scored by this model in the same backend call as the shard's generation
    (`Backend.generate_and_score`: one context pass for both)."""
    sampling = cfg.sampling
    params_key = config_hash(sampling.key())
    refs = reference_requests(backend, chunk) if references else []
    ref_rows: list[dict] = []
    ref_shard = _shard_path(parts, "ref", backend.fingerprint(), [f"{p.id}/{m}" for p, m, *_ in refs], params_key)
    if refs and ref_shard.is_file():
        ref_rows = read_rows(ref_shard)
        refs = []
    prepared = []
    for p in chunk:
        ids, reason = prepare_prompt(backend, p, cfg)
        if ids is None:
            rejected.append({"prompt_id": p.id, "model": model, "reason": reason})
            stats[f"rejected_{reason}"] = stats.get(f"rejected_{reason}", 0) + 1
            continue
        if reason == "truncated":
            stats["truncated"] = stats.get("truncated", 0) + 1
        prepared.append((p, ids))
    shard = _shard_path(parts, "gen", f"{backend.kind}:{backend.fingerprint()}", [p.id for p, _ in prepared],
                        params_key)
    done = shard.is_file()
    keys = [] if done else [cache.key(backend, ids, sampling) for _, ids in prepared]
    found = {k: g for k in keys if (g := cache.get(k)) is not None}
    todo = [(k, ids) for k, (_, ids) in zip(keys, [] if done else prepared, strict=True) if k not in found]
    generated, lls = backend.generate_and_score([ids for _, ids in todo], sampling, [r[3] for r in refs])
    if refs:
        write_rows(ref_shard, ref_rows := _reference_rows(refs, lls), schema=completion_schema())
    if done:
        stats["shards_reused"] = stats.get("shards_reused", 0) + 1
        return read_rows(shard), ref_rows
    for (k, _), gens in zip(todo, generated, strict=True):
        cache.put(k, gens)
        found[k] = gens
    rows = [completion_row(p, model, i, g, params_key)
            for (p, _), k in zip(prepared, keys, strict=True) for i, g in enumerate(found[k])]
    write_rows(shard, rows, schema=completion_schema())
    return rows, ref_rows


def generate_for_model(
    backend: Backend, model: str, prompts: list[Prompt], cfg: GenerationConfig, parts: Path,
    cache: GenerationCache, bar, stats: dict, rejected: list[dict], references: bool = False,
) -> list[dict]:
    """Completion rows of one model for all `prompts` (in memory), shard by shard (`generate_chunk`), then the
    reference answers' rows."""
    rows: list[dict] = []
    ref_rows: list[dict] = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        got, refs = generate_chunk(backend, model, chunk, cfg, parts, cache, stats, rejected, references)
        rows += got
        ref_rows += refs
        bar.update(len(chunk))
    return rows + ref_rows


def completion_schema():
    """Arrow schema of `generate/completions.parquet` (`Completion.to_row()`)."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("prompt_id", pa.string()), ("model", pa.string()), ("text", pa.string()),
                      ("sample_index", pa.int64()), ("num_tokens", pa.int64()), ("mean_logprob", pa.float64()),
                      ("entropy", pa.float64()), ("finish_reason", pa.string()), ("seed", pa.int64())])


def by_prompt_order(chunk: list[Prompt], rows: list[dict]) -> list[dict]:
    """`rows` of a shard grouped by prompt, in the shard's prompt order (a stable sort: per prompt, the models in
    their order, each model's samples, then its references): every reader can stream completions by prompt."""
    position = {p.id: i for i, p in enumerate(chunk)}
    seen: set[str] = set()
    unique = [row for row in rows if not (row["id"] in seen or seen.add(row["id"]))]  # an id's first row wins
    return sorted(unique, key=lambda row: position[row["prompt_id"]])


def reference_requests(backend: Backend, prompts: list[Prompt]) -> list[tuple[Prompt, str, str, tuple[list[int], list[int]]]]:
    """(prompt, model name `reference:chosen|rejected`, answer, (context, continuation ids)) for each HH reference
    answer of `prompts`: the answer read after the prompt's chat rendering, as the generator's own samples are."""
    out = []
    for p in prompts:
        answers = [(model, text) for model, key in REFERENCE_KEYS.items()
                   if isinstance(text := p.metadata.get(key), str) and text.strip()]
        rendered = backend.encode(backend.render_chat(p.messages)) if answers else []
        for model, text in answers:
            ctx, cont, _ = fit_request(rendered, backend.encode(text) + [backend.eos_token_id], backend.max_model_len)
            out.append((p, model, text, (ctx, cont)))
    return out


def _reference_rows(refs: list, lls: list[list[float]]) -> list[dict]:
    """Completion rows of reference answers with their mean logprob (`lls`: per request of `refs`)."""
    return [
        Completion(
            id=Completion.make_id(p.id, model, 0, "reference"), prompt_id=p.id, model=model, text=text,
            sample_index=0, num_tokens=len(cont), mean_logprob=sum(ll) / len(ll), entropy=-sum(ll) / len(ll),
            finish_reason="reference",
        ).to_row()
        for (p, model, text, (_, cont)), ll in zip(refs, lls, strict=True)
    ]


# --------------------------------------------------------------------------------------------------- step
def generator_info(backend: Backend) -> dict:
    """What identifies a generator's logprobs (for `curate score` to reuse them): its weights+dtype fingerprint,
    backend and context length."""
    return {"backend": backend.kind, "fingerprint": backend.fingerprint(), "dtype": backend.dtype,
            "max_model_len": backend.max_model_len}


def run_generate(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Round step `generate` (see the module docstring). Streams the pool in shards of `batch_size` prompts;
    `completions.parquet` is written as it goes, grouped by prompt in pool order (bounded memory)."""
    from curation.steps.pool import count_prompts

    gen: GenerationConfig = cfg.generation
    pool = rnd.step("pool")
    run = rnd.start_step("generate", gen, inputs=(pool,), seeds={"seed": cfg.seed, "generation.seed": gen.seed},
                         force=force)
    if run is None:
        return rnd.step("generate").manifest()
    with run:
        n_prompts = count_prompts(rnd)
        run.extra["hardware"] = announce_hardware("generate", gen.backend)
        cache_root = (gen.cache_dir or default_cache_dir()) if gen.cache else None
        stats: dict[str, int] = {"cache_hits": 0, "cache_misses": 0}
        generators: dict[str, dict] = {}
        timings: dict[str, dict[str, float]] = {}
        prompts_file = pool.file("prompts.parquet")
        shards = shard_ranges(n_prompts, gen.sharding.num_shards if gen.sharding.backend != "none" else 1)
        streams: list[list[dict]] = []  # per model: per shard, its stream file and its rows per chunk
        with open(run.path / "rejected.jsonl", "w") as rejected_out:
            for index, model in enumerate(gen.models):
                results = map_shards(
                    generate_shard, shards, gen.sharding, config=to_dict(gen), model=model, model_index=index,
                    prompts_file=str(prompts_file), parts=str(run.parts_dir),
                    cache_root=str(cache_root) if cache_root else None,
                    references=gen.include_references and index == 0,
                    progress=progress and gen.sharding.backend == "none",
                )
                streams.append(results)
                for shard, result in enumerate(results):
                    generators[model] = result["generator"]
                    label = model if len(results) == 1 else f"{model} (shard {shard})"
                    timings[label] = result["timings"]
                    for key, value in result["stats"].items():
                        stats[key] = stats.get(key, 0) + value
                    with open(result["rejected"]) as fh:
                        shutil.copyfileobj(fh, rejected_out)
        if gen.sharding.backend != "none":
            run.counts["shards"] = gen.sharding.num_shards
        totals = merge_streams(streams, prompts_file, run.path / "completions.parquet", gen.batch_size)
        if gen.include_references:
            for name in sorted(set(totals["models"]) & REFERENCE_KEYS.keys()):  # scored by the 1st generator
                generators[name] = generators[gen.models[0]]
        cache_hits, cache_misses = stats.pop("cache_hits"), stats.pop("cache_misses")
        run.counts.update({
            "prompts": n_prompts, "completions": totals["completions"], "models": len(gen.models),
            "prompts_with_completions": totals["prompts"],
            "references": sum(v for m, v in totals["models"].items() if m in REFERENCE_KEYS),
            "rejected_empty": 0, "rejected_too_long": 0, "truncated": 0, "shards_reused": 0,
            **stats, "cache_hits": cache_hits, "cache_misses": cache_misses,
        })
        for model in gen.models:
            run.counts[f"completions::{model}"] = totals["models"].get(model, 0)
        run.extra["generators"] = generators
        run.extra["timings"] = timings
        for name, spent in timings.items():
            print(f"generate: {name}: {format_timings(spent)}", flush=True)
    return rnd.step("generate").manifest()


def shard_ranges(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, balanced [start, stop) row ranges of a pool of n prompts (`curation.sharded.split`'s bounds)."""
    from curation.sharded import split

    return [(s[0], s[-1] + 1) for s in split(range(n), num_shards)] if n else []


def generate_shard(ranges: list[tuple[int, int]], *, config: dict, model: str, model_index: int, prompts_file: str,
                   parts: str, cache_root: str | None, references: bool, progress: bool = False) -> dict:
    """One model over rows [start, stop) of the pool (one shard; locally the whole pool, or a Ray task reading its
    rows from shared storage): its own backend, the resumable parts and the cache. The rows go to a stream file
    in `parts` (per shard of `batch_size` prompts: the model's samples, then its references), the rejected prompts
    to a jsonl beside it; what comes back is small (paths, rows per chunk, counts)."""
    from tqdm.auto import tqdm

    from preference.plumbing.io import RowWriter, iter_row_range

    gen = from_dict(GenerationConfig, config)
    ((start, stop),) = ranges
    cache = GenerationCache(Path(cache_root) if cache_root else None)
    stats: dict[str, int] = {}
    rejected: list[dict] = []
    parts_dir = Path(parts)
    stream = parts_dir / f"stream-m{model_index}-{start}-{stop}.parquet"
    rejected_file = parts_dir / f"rejected-m{model_index}-{start}-{stop}.jsonl"
    chunk_rows: list[int] = []
    with (tqdm(total=stop - start, desc="generate", unit="prompt", disable=not progress) as bar,
          load_backend(model, gen.backend) as backend, RowWriter(stream, completion_schema()) as out,
          open(rejected_file, "w") as rejected_out):
        for table in iter_row_range(prompts_file, start, stop, gen.batch_size):
            chunk = [Prompt.from_row(r) for r in table.to_pylist()]
            rows, refs = generate_chunk(backend, model, chunk, gen, parts_dir, cache, stats, rejected,
                                        references=references)
            out.write(by_prompt_order(chunk, rows + refs))
            chunk_rows.append(len(rows) + len(refs))
            for r in rejected:
                rejected_out.write(json.dumps(r) + "\n")
            rejected.clear()
            bar.update(len(chunk))
        generator = generator_info(backend)
    stats["cache_hits"], stats["cache_misses"] = cache.hits, cache.misses
    return {"range": [start, stop], "stream": str(stream), "chunk_rows": chunk_rows, "stats": stats, "rejected": str(rejected_file),
            "generator": generator, "timings": backend.timings}


def merge_streams(streams: list[list[dict]], prompts_file: Path, out_path: Path, batch_size: int) -> dict:
    """The models' stream files → `completions.parquet`, grouped by prompt in pool order (per prompt: the models
    in config order, each with its samples then its references), one shard of prompts at a time (Arrow, bounded
    memory). Returns {"completions", "prompts" (with at least one completion), "models": {model: rows}}."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from preference.plumbing.io import RowWriter, iter_row_range

    totals: dict = {"completions": 0, "prompts": 0, "models": {}}
    readers = [_ChunkReader(results) for results in streams]
    ranges = [tuple(r["range"]) for r in streams[0]] if streams else []
    with RowWriter(out_path, completion_schema()) as out:
        for batch in (b for start, stop in ranges for b in iter_row_range(prompts_file, start, stop, batch_size)):
            # the same chunks as the generation shards: `batch_size` prompts from each shard's start
            pieces = [r.next_chunk() for r in readers]
            table = pa.concat_tables(pieces) if pieces else None
            if table is None or not table.num_rows:
                continue
            position = pc.index_in(table.column("prompt_id"), value_set=batch.column("id"))
            table = table.take(pc.sort_indices(pa.table({"p": position, "i": pa.array(range(table.num_rows))}),
                                               sort_keys=[("p", "ascending"), ("i", "ascending")]))
            out.write_table(table)
            totals["completions"] += table.num_rows
            totals["prompts"] += len(pc.unique(table.column("prompt_id")))
            for model, count in zip(*[c.to_pylist() for c in
                                      pc.value_counts(table.column("model")).flatten()], strict=True):
                totals["models"][model] = totals["models"].get(model, 0) + count
    for results in streams:
        for result in results:
            Path(result["stream"]).unlink(missing_ok=True)
            Path(result["rejected"]).unlink(missing_ok=True)
    return totals


class _ChunkReader:
    """Reads a model's shard stream files chunk by chunk (the rows each generation shard wrote)."""

    def __init__(self, results: list[dict]):
        self.results = results
        self.shard = -1
        self.chunk = 0
        self.batches = iter(())
        self.buffer = None

    def _advance(self):
        from preference.plumbing.io import iter_batches

        while self.shard < 0 or self.chunk >= len(self.results[self.shard]["chunk_rows"]):
            self.shard += 1
            self.chunk = 0
            self.batches = iter(iter_batches(self.results[self.shard]["stream"]))
            self.buffer = None

    def next_chunk(self):
        import pyarrow as pa

        self._advance()
        want = self.results[self.shard]["chunk_rows"][self.chunk]
        self.chunk += 1
        pieces, have = [], 0
        while have < want:
            if self.buffer is None or not self.buffer.num_rows:
                self.buffer = pa.Table.from_batches([next(self.batches)])
            take = min(want - have, self.buffer.num_rows)
            pieces.append(self.buffer.slice(0, take))
            self.buffer = self.buffer.slice(take)
            have += take
        return pa.concat_tables(pieces) if pieces else pa.Table.from_pylist([], schema=completion_schema())


def load_completions(rnd) -> list[Completion]:
    """The completions of a round's finished `generate` step."""
    return [Completion.from_row(r) for r in read_rows(rnd.step("generate").file("completions.parquet"))]


__all__ = ["GenerationCache", "GenerationConfig", "load_completions", "prepare_prompt", "run_generate"]
