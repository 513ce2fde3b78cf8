"""`curate score`: perplexities, committee disagreement and embeddings for generated completions.

Every completion of the round's `generate` step is scored under every committee member: the log-probability of
each completion token given the chat-rendered prompt and the earlier completion tokens (vLLM `prompt_logprobs`
on prompt+completion; only completion tokens are scored). A finished completion (finish_reason != "length")
is scored with its end-of-turn token appended, as the generator produced it. The prompt itself is scored as
plain text (`Prompt.text`) after a single end-of-text token (lm-eval's rolling-loglikelihood convention).
Requests longer than the model context keep the completion and drop the start of the prompt (`fit_request`).

Committee members are model specs: a built-in name or an HF model folder, optionally with a weight-noise
variant `"<name-or-folder>:noise=<scale>[:seed=<int>]"` that is materialized once into the model cache
(`noisy_variant`: Gaussian noise of `scale` × each weight matrix's std; a cheap perturbation ensemble, the
offline stand-in for a second independently trained model). A member's column name is its spec with a folder
shown by its name (`/models/rm-3:noise=0.02` → `rm-3:noise=0.02`).

Embeddings are the mean-pooled last hidden states of `embedding_model` (default: the first committee member)
run through transformers (vLLM's generate runner does not return hidden states); completions are embedded as
their text alone, prompts as `Prompt.text`.

Outputs (column directions):

`score/completion_scores.parquet`, one row per completion:
- completion_id, prompt_id, model (the generator, or reference:chosen / reference:rejected)
- `logprob_mean::<member>`: mean per-token logprob of the completion given the prompt; higher = the member
  finds it more likely
- `ppl::<member>`: exp(-logprob_mean); higher = more surprising
- committee_std: std (ddof 0) across members of logprob_mean; higher = more disagreement (0 with one member)
- embedding: list<float32>

`score/prompt_scores.parquet`, one row per prompt that has completions:
- prompt_id, slice
- prompt_perplexity: mean over members of the prompt text's perplexity; higher = more unusual prompt
- mean_completion_perplexity: mean over completions and members of ppl; higher = more surprising answers
- mean_logprob: mean over completions of the generator's mean token logprob; LOWER = more uncertain generator
- mean_entropy: mean over completions of the generator's entropy proxy; higher = more uncertain generator
- committee_disagreement: mean over completions of committee_std; higher = more disagreement
- committee_range: mean over completions of (max - min) logprob_mean across members; higher = more disagreement
- vote_entropy: entropy (nats) of the members' votes for their most likely completion; higher = members
  prefer different answers (0 = unanimous or a single member; at most ln(min(members, completions)))
- semantic_spread: mean pairwise cosine distance of the prompt's completion embeddings; higher = more diverse
  answers (NaN with fewer than two completions)
- embedding: list<float32>, the prompt's embedding (for diversity / core-set selection)

Resumable like `generate`: log-likelihoods and embeddings are computed in shards of `batch_size` items,
written to `parts/` and reused on a rerun.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from curation.backends import Backend, BackendSettings, fit_request, load_backend
from curation.sharded import ShardingConfig, map_shards
from preference.plumbing.config import from_dict, to_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import atomic_path, read_rows, write_json, write_rows
from preference.schema import Completion, Prompt, stable_id

DEFAULT_COMMITTEE = ["smollm2-135m-instruct", "smollm2-135m-instruct:noise=0.02:seed=1"]


@dataclass
class ScoringConfig:
    backend: Literal["vllm", "transformers", "dummy"] = "vllm"
    committee: list[str] = field(default_factory=lambda: list(DEFAULT_COMMITTEE))  # member specs (see above)
    embedding_model: str | None = None  # None = the first committee member
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    kv_cache_space_gib: float = 1.0
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    batch_size: int = 256  # requests per backend call and per resumable shard
    micro_batch_size: int = 8  # transformers: sequences per forward pass
    embed_max_tokens: int = 512
    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # Ray: score pool shards on a cluster

    def __post_init__(self):
        if not self.committee:
            raise ValueError("committee is empty; list at least one model, e.g. [smollm2-135m-instruct]")
        for spec in self.committee:
            parse_member(spec)
        names = [member_name(s) for s in self.committee]
        if len(set(names)) != len(names):
            raise ValueError(f"committee members must have distinct names, got {names}")
        for key in ("batch_size", "micro_batch_size", "embed_max_tokens", "tensor_parallel_size",
                    "data_parallel_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.kv_cache_space_gib <= 0:
            raise ValueError(f"kv_cache_space_gib must be > 0, got {self.kv_cache_space_gib}")

    @property
    def settings(self) -> BackendSettings:
        return BackendSettings(
            dtype=self.dtype, max_model_len=self.max_model_len, kv_cache_space_gib=self.kv_cache_space_gib,
            tensor_parallel_size=self.tensor_parallel_size, data_parallel_size=self.data_parallel_size,
            batch_size=self.micro_batch_size, embed_max_tokens=self.embed_max_tokens,
        )


# ------------------------------------------------------------------------------------------ committee specs
def parse_member(spec: str) -> tuple[str, float | None, int]:
    """`"base[:noise=<scale>[:seed=<int>]]"` → (base, noise scale or None, seed). ValueError when malformed."""
    base, *opts = spec.split(":")
    if not base:
        raise ValueError(f"committee member {spec!r}: empty model name")
    values: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("noise", "seed") or key in values:
            raise ValueError(
                f"committee member {spec!r}: expected '<model>' or '<model>:noise=<scale>[:seed=<int>]', "
                f"got option {opt!r}"
            )
        values[key] = value
    if "seed" in values and "noise" not in values:
        raise ValueError(f"committee member {spec!r}: seed= needs noise=")
    try:
        noise = float(values["noise"]) if "noise" in values else None
        seed = int(values.get("seed", 0))
    except ValueError as exc:
        raise ValueError(f"committee member {spec!r}: {exc}") from exc
    if noise is not None and not (0 < noise < 1):
        raise ValueError(f"committee member {spec!r}: noise must be in (0, 1) (relative to weight std), got {noise}")
    return base, noise, seed


def member_name(spec: str) -> str:
    """Column-name form of a member spec: a folder is shown by its name, options are kept."""
    base, _, options = spec.partition(":")
    parse_member(spec)
    if "/" in base or Path(base).expanduser().is_dir():
        base = Path(base).expanduser().name
    return f"{base}:{options}" if options else base


def noisy_variant(base: Path, scale: float, seed: int, cache: Path | None = None) -> Path:
    """Materialize (once) a copy of model folder `base` whose ≥2-D weights get N(0, (scale·std(W))²) noise.

    Deterministic in (base weights, scale, seed); written to `<cache>/models/variants/` and finished by a marker
    file, like `training.models`. Norm weights and biases are left alone.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from curation.backends import model_fingerprint
    from training.models import MARKER, cache_dir

    root = (cache or cache_dir()) / "models" / "variants"
    folder = root / f"{base.name}-noise{scale:g}-seed{seed}-{model_fingerprint(base)[:8]}"
    if (folder / MARKER).is_file():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != MARKER:
            shutil.copy2(f, staging / f.name)
    weights = sorted(base.glob("*.safetensors"))
    if not weights:
        raise CurateError(f"{base}: no .safetensors weights to perturb; save the model with safe_serialization")
    for f in weights:
        tensors = load_file(f)
        for index, name in enumerate(sorted(tensors)):
            t = tensors[name]
            if t.is_floating_point() and t.dim() >= 2:
                gen = torch.Generator().manual_seed(seed * 100_003 + index)
                w = t.float()
                tensors[name] = (w + scale * w.std() * torch.randn(w.shape, generator=gen)).to(t.dtype)
        save_file(tensors, staging / f.name, metadata={"format": "pt"})
    write_json(staging / MARKER, {"name": folder.name, "base": str(base), "noise": scale, "seed": seed})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def resolve_member(spec: str, backend: str) -> str | Path:
    """What to hand to `load_backend` for a member spec (dummy: the spec itself, a name)."""
    base, noise, seed = parse_member(spec)
    if backend == "dummy":
        return spec
    from training.models import resolve_model

    path = resolve_model(base)
    return noisy_variant(path, noise, seed) if noise is not None else path


# ------------------------------------------------------------------------------------------------ scoring
def score_requests(
    backend: Backend, items: list[tuple[str, list[int], list[int]]], parts: Path, batch_size: int, bar=None,
) -> tuple[dict[str, tuple[float, int]], int]:
    """{item id: (sum logprob, n tokens)} for (id, context ids, continuation ids) items, shard by shard."""
    out: dict[str, tuple[float, int]] = {}
    truncated = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        shard = parts / f"ll-{stable_id(backend.kind, backend.fingerprint(), chunk, length=20)}.parquet"
        if shard.is_file():
            rows = read_rows(shard)
        else:
            fitted = [fit_request(ctx, cont, backend.max_model_len) for _, ctx, cont in chunk]
            lls = backend.loglikelihood([(c, x) for c, x, _ in fitted])
            rows = [
                {"id": item[0], "sum_logprob": float(sum(ll)), "num_tokens": len(ll), "truncated": f[2]}
                for item, f, ll in zip(chunk, fitted, lls, strict=True)
            ]
            write_rows(shard, rows)
        for r in rows:
            out[r["id"]] = (r["sum_logprob"], r["num_tokens"])
            truncated += bool(r["truncated"])
        if bar is not None:
            bar.update(len(chunk))
    return out, truncated


def build_requests(
    backend: Backend, prompts: dict[str, Prompt], completions: list[Completion]
) -> list[tuple[str, list[int], list[int]]]:
    """(id, context, continuation) for every completion ("c/<id>") and prompt ("p/<id>")."""
    rendered = {pid: backend.encode(backend.render_chat(p.messages)) for pid, p in prompts.items()}
    items = []
    for c in completions:
        cont = backend.encode(c.text)
        if c.finish_reason != "length" or not cont:
            cont = cont + [backend.eos_token_id]
        items.append((f"c/{c.id}", rendered[c.prompt_id], cont))
    for pid, p in prompts.items():
        cont = backend.encode(p.text) or [backend.eos_token_id]
        items.append((f"p/{pid}", [backend.eos_token_id], cont))
    return items


def embed_texts(backend: Backend, items: list[tuple[str, str]], parts: Path, batch_size: int, bar=None
                ) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        shard = parts / f"emb-{stable_id(backend.kind, backend.fingerprint(), chunk, length=20)}.npy"
        if shard.is_file():
            vecs = np.load(shard, allow_pickle=False)
        else:
            vecs = backend.embed([t for _, t in chunk]).astype(np.float32)
            with atomic_path(shard) as tmp, open(tmp, "wb") as fh:
                np.save(fh, vecs, allow_pickle=False)
        for (item_id, _), v in zip(chunk, vecs, strict=True):
            out[item_id] = v
        if bar is not None:
            bar.update(len(chunk))
    return out


def vote_entropy(lp: np.ndarray) -> float:
    """lp: (members, completions) mean logprobs. Entropy (nats) of the members' argmax votes."""
    if lp.shape[1] == 0:
        return float("nan")
    counts = np.bincount(lp.argmax(axis=1), minlength=lp.shape[1]).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(max(0.0, -(p * np.log(p)).sum()))


def semantic_spread(vecs: np.ndarray) -> float:
    """Mean pairwise cosine distance of the rows of `vecs` (NaN with fewer than two rows)."""
    if len(vecs) < 2:
        return float("nan")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    unit = vecs / np.where(norms > 0, norms, 1.0)
    sims = unit @ unit.T
    iu = np.triu_indices(len(vecs), k=1)
    return float(np.mean(1.0 - sims[iu]))


def _nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _write_with_embeddings(path: Path, rows: list[dict]) -> None:
    """Parquet with `embedding` stored as list<float32>."""
    table = pa.Table.from_pylist(rows)
    idx = table.schema.get_field_index("embedding")
    table = table.set_column(idx, pa.field("embedding", pa.list_(pa.float32())),
                             table.column(idx).cast(pa.list_(pa.float32())))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def compute_scores(
    prompts: dict[str, Prompt], completions: list[Completion], members: list[str],
    lls: dict[str, dict[str, tuple[float, int]]], emb: dict[str, np.ndarray],
) -> tuple[list[dict], list[dict]]:
    """Completion rows and prompt rows from per-member log-likelihoods and embeddings."""
    def mean_lp(member: str, key: str) -> float:
        s, n = lls[member][key]
        return s / n if n else float("nan")

    comp_rows = []
    by_prompt: dict[str, list[int]] = defaultdict(list)
    lp_matrix = np.array([[mean_lp(m, f"c/{c.id}") for m in members] for c in completions]).reshape(-1, len(members))
    for i, c in enumerate(completions):
        row = {"completion_id": c.id, "prompt_id": c.prompt_id, "model": c.model}
        for j, m in enumerate(members):
            row[f"logprob_mean::{m}"] = float(lp_matrix[i, j])
        for j, m in enumerate(members):
            row[f"ppl::{m}"] = float(math.exp(-lp_matrix[i, j]))
        row["committee_std"] = float(lp_matrix[i].std())
        row["embedding"] = emb[f"c/{c.id}"].tolist()
        comp_rows.append(row)
        by_prompt[c.prompt_id].append(i)
    prompt_rows = []
    for pid, idx in by_prompt.items():
        p = prompts[pid]
        lp = lp_matrix[idx]  # (completions, members)
        prompt_rows.append({
            "prompt_id": pid,
            "slice": p.slice,
            "prompt_perplexity": _nanmean(math.exp(-mean_lp(m, f"p/{pid}")) for m in members),
            "mean_completion_perplexity": float(np.exp(-lp).mean()),
            "mean_logprob": _nanmean(completions[i].mean_logprob for i in idx),
            "mean_entropy": _nanmean(completions[i].entropy for i in idx),
            "committee_disagreement": float(lp.std(axis=1).mean()),
            "committee_range": float((lp.max(axis=1) - lp.min(axis=1)).mean()),
            "vote_entropy": vote_entropy(lp.T),
            "semantic_spread": semantic_spread(np.stack([emb[f"c/{completions[i].id}"] for i in idx])),
            "embedding": emb[f"p/{pid}"].tolist(),
        })
    return comp_rows, prompt_rows


# --------------------------------------------------------------------------------------------------- step
def score_prompts(sc: ScoringConfig, prompts: dict[str, Prompt], completions: list[Completion], parts: Path,
                  bar=None) -> tuple[dict[str, dict[str, tuple[float, int]]], dict[str, np.ndarray], int]:
    """Log-likelihoods under every committee member, and embeddings, for these prompts and completions."""
    lls: dict[str, dict[str, tuple[float, int]]] = {}
    truncated = 0
    for spec in sc.committee:
        with load_backend(sc.backend, resolve_member(spec, sc.backend), sc.settings) as backend:
            items = build_requests(backend, prompts, completions)
            lls[member_name(spec)], t = score_requests(backend, items, parts, sc.batch_size, bar)
            truncated += t
    embed_spec = sc.embedding_model or sc.committee[0]
    embed_kind = "dummy" if sc.backend == "dummy" else "transformers"
    with load_backend(embed_kind, resolve_member(embed_spec, sc.backend), sc.settings) as backend:
        texts = [(f"c/{c.id}", c.text) for c in completions] + [(f"p/{p}", q.text) for p, q in prompts.items()]
        emb = embed_texts(backend, texts, parts, sc.batch_size, bar)
    return lls, emb, truncated


def score_shard(work: list[tuple[dict, list[dict]]], *, config: dict, parts: str) -> dict:
    """One shard of `run_score` (a Ray task): (prompt row, its completion rows) items, plain values back."""
    sc = from_dict(ScoringConfig, config)
    prompts = {row["id"]: Prompt.from_row(row) for row, _ in work}
    completions = [Completion.from_row(c) for _, rows in work for c in rows]
    lls, emb, truncated = score_prompts(sc, prompts, completions, Path(parts))
    return {"lls": {name: {k: list(v) for k, v in part.items()} for name, part in lls.items()},
            "embeddings": {k: v.tolist() for k, v in emb.items()}, "truncated": truncated}


def run_score(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Round step `score` (see the module docstring)."""
    from curation.generate import load_completions
    from curation.pool import load_prompts

    sc: ScoringConfig = cfg.scoring
    run = rnd.start_step("score", sc, inputs=(rnd.step("pool"), rnd.step("generate")), seeds={"seed": cfg.seed},
                         force=force)
    if run is None:
        return rnd.step("score").manifest()
    with run:
        completions = load_completions(rnd)
        all_prompts = {p.id: p for p in load_prompts(rnd)}
        missing = sorted({c.prompt_id for c in completions} - set(all_prompts))
        if missing:
            raise CurateError(f"{len(missing)} completions point at prompts not in the pool (e.g. {missing[0]}); "
                              "redo `curate generate --force`")
        prompts = {pid: all_prompts[pid] for pid in dict.fromkeys(c.prompt_id for c in completions)}
        members = [member_name(s) for s in sc.committee]
        embed_spec = sc.embedding_model or sc.committee[0]
        if sc.sharding.backend == "none":
            n_items = len(completions) + len(prompts)
            with tqdm(total=n_items * (len(members) + 1), desc="score", unit="item", disable=not progress) as bar:
                lls, emb, truncated = score_prompts(sc, prompts, completions, run.parts_dir, bar)
        else:
            by_prompt: dict[str, list[dict]] = defaultdict(list)
            for c in completions:
                by_prompt[c.prompt_id].append(c.to_row())
            work = [(p.to_row(), by_prompt[pid]) for pid, p in prompts.items()]
            lls, emb, truncated = {name: {} for name in members}, {}, 0
            for result in map_shards(score_shard, work, sc.sharding, config=to_dict(sc), parts=str(run.parts_dir)):
                for name, part in result["lls"].items():
                    lls[name].update({k: (v[0], int(v[1])) for k, v in part.items()})
                emb.update({k: np.asarray(v, dtype=np.float32) for k, v in result["embeddings"].items()})
                truncated += result["truncated"]
            run.counts["shards"] = sc.sharding.num_shards
        comp_rows, prompt_rows = compute_scores(prompts, completions, members, lls, emb)
        if comp_rows:
            _write_with_embeddings(run.path / "completion_scores.parquet", comp_rows)
            _write_with_embeddings(run.path / "prompt_scores.parquet", prompt_rows)
        else:
            write_rows(run.path / "completion_scores.parquet", [])
            write_rows(run.path / "prompt_scores.parquet", [])
        run.counts.update({
            "completions": len(comp_rows), "prompts": len(prompt_rows), "members": len(members),
            "prompts_without_completions": len(all_prompts) - len(prompts), "truncated_requests": truncated,
        })
        run.extra["committee"] = members
        run.extra["embedding_model"] = member_name(embed_spec)
    return rnd.step("score").manifest()


__all__ = [
    "ScoringConfig",
    "compute_scores",
    "member_name",
    "noisy_variant",
    "parse_member",
    "resolve_member",
    "run_score",
    "semantic_spread",
    "vote_entropy",
]
