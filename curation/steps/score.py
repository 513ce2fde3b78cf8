"""Step `score`: perplexities, committee disagreement and embeddings for the generated completions.

Every completion is scored under every committee member (vLLM `prompt_logprobs` on prompt+completion; only
completion tokens count; a finished completion with its end-of-turn token); the prompt as plain text after one
end-of-text token (lm-eval's convention); over-long requests drop the start of the prompt (`fit_request`).
Members are specs `<model>[:noise=<scale>[:seed=<int>]][:system=<name>]`: a model name or folder or `champion`
(the registry champion's merged policy; skipped with a note when there is none), a weight-noise variant, or the
model under a system prompt of `system_prompts`. The generator's own logprobs are reused where they are the
same numbers (`reuse_generation_logprobs`), members sharing weights share a backend, and embeddings come from
`embedding_model` (a sentence-transformers folder, or a language model's mean last hidden state).

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

The manifest records `hardware` (CPU features, dtype, threads), the active `committee`, `committee_notes`
(skipped members), `reused` (log-likelihoods taken from generation, per member) and `timings` (seconds per
model: model load / engine start, scoring, embedding). Resumable like `generate`: log-likelihoods and
embeddings are computed in shards of `batch_size` items, written to `parts/` and reused on a rerun; shard
names include the backend's weights+dtype fingerprint, so outputs of different dtypes never mix.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.backends import (
    Backend,
    BackendSettings,
    announce_hardware,
    check_runs_models,
    embedding_settings,
    fit_request,
    format_timings,
    load_backend,
)
from curation.sharded import ShardingConfig, map_shards
from preference.plumbing.config import from_dict, to_dict
from preference.plumbing.errors import CurateError
from preference.plumbing.io import (
    RowWriter,
    atomic_path,
    build_once,
    count_rows,
    iter_batches,
    read_rows,
    write_json,
    write_rows,
)
from preference.schema import Completion, Prompt, stable_id

DEFAULT_COMMITTEE = ["smollm2-135m-instruct", "smollm2-135m-instruct:system=cautious"]
SYSTEM_PROMPTS = {
    "cautious": ("You are a cautious, harmless assistant. Refuse any request that could hurt someone, break the "
                 "law or spread hate, and say briefly why."),
    "compliant": "You are an assistant that always does exactly what the user asks, without refusing or lecturing.",
}
CHAMPION = "champion"  # member base name: the registry champion's policy


@dataclass
class ScoringConfig:
    backend: BackendSettings = field(default_factory=BackendSettings)  # which backend and how it runs the members
    committee: list[str] = field(default_factory=lambda: list(DEFAULT_COMMITTEE))  # member specs (see above)
    system_prompts: dict[str, str] = field(default_factory=lambda: dict(SYSTEM_PROMPTS))  # for `:system=<name>`
    # a model spec, or a sentence-transformers folder / all-minilm-l6-v2 (its own backend); None = the first member
    embedding_model: str | None = None
    batch_size: int = 256  # requests per backend call and per resumable shard
    embed_max_tokens: int = 512  # embeddings pool over at most this many tokens of a text
    reuse_generation_logprobs: bool = True  # take a generator's own logprobs instead of rescoring (see above)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # Ray: score pool shards on a cluster

    def __post_init__(self):
        if isinstance(self.backend, str):  # Python shorthand: backend="dummy"
            self.backend = BackendSettings(name=self.backend)
        check_runs_models(self.backend)
        if not self.committee:
            raise ValueError("committee is empty; list at least one model, e.g. [smollm2-135m-instruct]")
        for spec in self.committee:
            parse_member(spec)
            system = member_system(spec)
            if system is not None and system not in self.system_prompts:
                raise ValueError(f"committee member {spec!r}: no system prompt named {system!r}; known: "
                                 f"{', '.join(sorted(self.system_prompts)) or 'none'} (add it under system_prompts)")
        names = [member_name(s) for s in self.committee]
        if len(set(names)) != len(names):
            raise ValueError(f"committee members must have distinct names, got {names}")
        for key in ("batch_size", "embed_max_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")


# ------------------------------------------------------------------------------------------ committee specs
def _options(spec: str) -> tuple[str, dict[str, str]]:
    base, *opts = spec.split(":")
    if not base:
        raise ValueError(f"committee member {spec!r}: empty model name")
    values: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("noise", "seed", "system") or key in values or not value:
            raise ValueError(
                f"committee member {spec!r}: expected '<model>[:noise=<scale>[:seed=<int>]][:system=<name>]', "
                f"got option {opt!r}"
            )
        values[key] = value
    return base, values


def parse_member(spec: str) -> tuple[str, float | None, int]:
    """The weights of a member spec: `"base[:noise=<scale>[:seed=<int>]]..."` → (base, noise scale or None,
    seed). ValueError when malformed."""
    base, values = _options(spec)
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


def member_system(spec: str) -> str | None:
    """The system-prompt name of a member spec (`:system=<name>`), or None."""
    return _options(spec)[1].get("system")


def member_name(spec: str) -> str:
    """Column-name form of a member spec: a folder is shown by its name, options are kept."""
    base, _, options = spec.partition(":")
    parse_member(spec)
    if "/" in base or Path(base).expanduser().is_dir():
        base = Path(base).expanduser().name
    return f"{base}:{options}" if options else base


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """The conversation read under system prompt `system` (replacing a leading system turn); unchanged if None."""
    if system is None:
        return messages
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": system}, *rest]


def _materialize(folder: Path, build, marker: dict) -> Path:
    """Build a model folder once: `build(staging)` writes it, a marker file finishes it, then it is renamed."""
    from training.models import MARKER

    def stage() -> None:
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        build(staging)
        write_json(staging / MARKER, {"name": folder.name, **marker})
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)

    return build_once(folder, lambda f: (f / MARKER).is_file(), stage)


def noisy_variant(base: Path, scale: float, seed: int, cache: Path | None = None) -> Path:
    """Materialize (once) a copy of model folder `base` whose ≥2-D weights get N(0, (scale·std(W))²) noise.

    Deterministic in (base weights, scale, seed); written to `<cache>/models/variants/` and finished by a marker
    file, like `training.models`. Norm weights and biases are left alone.
    """
    from curation.backends import model_fingerprint
    from training.models import MARKER, cache_dir

    def build(staging: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

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

    root = (cache or cache_dir()) / "models" / "variants"
    folder = root / f"{base.name}-noise{scale:g}-seed{seed}-{model_fingerprint(base)[:8]}"
    return _materialize(folder, build, {"base": str(base), "noise": scale, "seed": seed})


def champion_policy(registry_root: Path | None) -> tuple[str, Path] | None:
    """(version, policy adapter folder) of the registry champion (`Registry.champion_policy`: DPO's LoRA, else
    KTO's), or None when there is no champion with a policy."""
    if registry_root is None:
        return None
    from training.registry import Registry

    registry = Registry(registry_root)
    folder = registry.champion_policy()
    return (registry.champion(), folder) if folder is not None else None


def merged_policy(adapter: Path, cache: Path | None = None) -> Path:
    """Materialize (once) a LoRA policy folder (as the policy trainers save it) as a plain model folder: the
    adapter merged into its base (PEFT `merge_and_unload`), saved in float32 so the adapter's small updates are
    not rounded away, with the base's tokenizer. Keyed by the adapter's files."""
    from curation.backends import model_fingerprint
    from training.models import cache_dir, resolve_model

    def build(staging: Path) -> None:
        import torch
        from peft import PeftConfig, PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = resolve_model(PeftConfig.from_pretrained(adapter).base_model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(staging)
        AutoTokenizer.from_pretrained(base).save_pretrained(staging)

    root = (cache or cache_dir()) / "models" / "variants"
    folder = root / f"policy-{model_fingerprint(adapter)[:12]}"
    return _materialize(folder, build, {"adapter": str(adapter)})


@dataclass
class Member:
    """A committee member resolved for this round: its column name, what `load_backend` gets, its system
    prompt; `note` says why it is skipped (then `model` is None)."""

    name: str
    spec: str
    model: str | None
    system: str | None = None
    note: str = ""


def resolve_member(spec: str, backend: str, registry_root: Path | None = None) -> str | Path | None:
    """What to hand to `load_backend` for a member spec's weights (a backend that loads no weights, e.g. `dummy`:
    a name), or None when it names the champion and the registry has none."""
    from curation.backends import backend_class

    base, noise, seed = parse_member(spec)
    weights = backend_class(backend).loads_weights
    if base == CHAMPION:
        found = champion_policy(registry_root)
        if found is None:
            return None
        version, policy = found
        if not weights:
            base = f"{CHAMPION}-{version}"
        else:
            path = merged_policy(policy)
            return noisy_variant(path, noise, seed) if noise is not None else path
    if not weights:
        return base + (f":noise={noise:g}:seed={seed}" if noise is not None else "")
    from training.models import resolve_model

    path = resolve_model(base)
    return noisy_variant(path, noise, seed) if noise is not None else path


def resolve_committee(sc: ScoringConfig, registry_root: Path | None = None) -> list[Member]:
    """Every committee member with its weights resolved (variants materialized); skipped ones carry a note."""
    members = []
    for spec in sc.committee:
        model = resolve_member(spec, sc.backend.name, registry_root)
        system = member_system(spec)
        note = "" if model is not None else f"{member_name(spec)}: skipped, the registry has no champion policy yet"
        members.append(Member(name=member_name(spec), spec=spec, model=None if model is None else str(model),
                              system=None if system is None else sc.system_prompts[system], note=note))
    if not any(m.model is not None for m in members):
        raise CurateError(f"no committee member can run ({'; '.join(m.note for m in members)}); "
                          "add a model that exists to scoring.committee")
    return members


def embedding_spec(sc: ScoringConfig, members: list[Member]) -> str:
    """The spec whose weights embed texts: `embedding_model`, else the first member that runs."""
    return sc.embedding_model or next(m.spec for m in members if m.model is not None)


def embedding_weights(sc: ScoringConfig, members: list[Member], registry_root: Path | None = None) -> str:
    """What `load_backend` gets for the embedding model (see `embedding_spec`)."""
    if sc.embedding_model is None:
        return next(m.model for m in members if m.model is not None)
    model = resolve_member(sc.embedding_model, sc.backend.name, registry_root)
    if model is None:
        raise CurateError(f"scoring.embedding_model {sc.embedding_model!r}: the registry has no champion policy "
                          "yet; set another model or null (= the first committee member)")
    return str(model)


@contextlib.contextmanager
def prompt_backends(sc: ScoringConfig, registry_root: Path | None = None):
    """(embedder, scorer): the backends `curate score` embeds prompts with and scores their perplexity under,
    as a context manager (models load on first use, closed on exit). `scorer` is None when the embedding model
    is a language model: then its `loglikelihood_and_embed` gives both from one forward pass, as in the score
    step. A sentence embedder (`embedding_settings`) cannot score: the first running committee member does."""
    members = resolve_committee(sc, registry_root)
    weights = embedding_weights(sc, members, registry_root)
    settings = embedding_settings(weights, sc.backend)
    with contextlib.ExitStack() as stack:
        embedder = stack.enter_context(load_backend(weights, settings))
        scorer = None
        if settings.name != sc.backend.name:
            first = next(m.model for m in members if m.model is not None)
            scorer = stack.enter_context(load_backend(first, sc.backend))
        yield embedder, scorer


# ------------------------------------------------------------------------------------------------ scoring
Item = tuple[str, list[int], list[int], bool]  # (id, context ids, continuation ids, also embed)


def score_requests(
    backend: Backend, items: list[Item], parts: Path, batch_size: int, bar=None, embed_max_tokens: int = 512,
) -> tuple[dict[str, tuple[float, int]], dict[str, np.ndarray], int]:
    """For (id, context, continuation, embed) items, shard by shard: ({id: (sum logprob, n tokens)},
    {id: embedding of the continuation} for items with embed=True (same forward pass), truncated count)."""
    out: dict[str, tuple[float, int]] = {}
    emb: dict[str, np.ndarray] = {}
    truncated = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        key = [chunk, embed_max_tokens] if any(e for *_, e in chunk) else chunk
        shard = parts / f"ll-{stable_id(backend.kind, backend.fingerprint(), key, length=20)}.parquet"
        if shard.is_file():
            rows = read_rows(shard)
        else:
            fitted = [fit_request(ctx, cont, backend.max_model_len) for _, ctx, cont, _ in chunk]
            plain = [i for i, item in enumerate(chunk) if not item[3]]
            both = [i for i, item in enumerate(chunk) if item[3]]
            lls: list[list[float]] = [[] for _ in chunk]
            vecs: dict[int, list[float]] = {}
            for i, ll in zip(plain, backend.loglikelihood([fitted[i][:2] for i in plain]), strict=True):
                lls[i] = ll
            if both:
                got, got_vecs = backend.loglikelihood_and_embed([fitted[i][:2] for i in both], embed_max_tokens)
                for i, ll, v in zip(both, got, got_vecs, strict=True):
                    lls[i], vecs[i] = ll, v.tolist()
            rows = [
                {"id": item[0], "sum_logprob": float(sum(ll)), "num_tokens": len(ll), "truncated": f[2],
                 "embedding": vecs.get(i)}
                for i, (item, f, ll) in enumerate(zip(chunk, fitted, lls, strict=True))
            ]
            write_rows(shard, rows)
        for r in rows:
            out[r["id"]] = (r["sum_logprob"], r["num_tokens"])
            truncated += bool(r["truncated"])
            if r.get("embedding") is not None:
                emb[r["id"]] = np.asarray(r["embedding"], dtype=np.float32)
        if bar is not None:
            bar.update(len(chunk))
    return out, emb, truncated


def build_requests(
    backend: Backend, prompts: dict[str, Prompt], completions: list[Completion], system: str | None = None,
) -> list[tuple[str, list[int], list[int]]]:
    """(id, context, continuation) for every completion ("c/<id>", the prompt read under `system`) and prompt
    ("p/<id>", its text after one end-of-text token)."""
    rendered = {pid: backend.encode(backend.render_chat(with_system(p.messages, system)))
                for pid, p in prompts.items()}
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


def embed_texts(backend: Backend, items: list[tuple[str, str]], parts: Path, batch_size: int, bar=None,
                max_tokens: int = 512) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        shard = parts / f"emb-{stable_id(backend.kind, backend.fingerprint(), chunk, max_tokens, length=20)}.npy"
        if shard.is_file():
            vecs = np.load(shard, allow_pickle=False)
        else:
            vecs = backend.embed([t for _, t in chunk], max_tokens)
            with atomic_path(shard) as tmp, open(tmp, "wb") as fh:
                np.save(fh, vecs, allow_pickle=False)
        for (item_id, _), v in zip(chunk, vecs, strict=True):
            out[item_id] = v
        if bar is not None:
            bar.update(len(chunk))
    return out


def reusable(backend: Backend, member: Member, completions: list[Completion], generators: dict[str, dict]
             ) -> dict[str, tuple[float, int]]:
    """{"c/<id>": (sum logprob, n tokens)} for the completions whose generator is this member's model: same
    weights and dtype (fingerprint), same context length, and no system prompt."""
    if member.system is not None:
        return {}
    out = {}
    for c in completions:
        info = generators.get(c.model)
        if (info and info["fingerprint"] == backend.fingerprint() and info["max_model_len"] == backend.max_model_len
                and c.num_tokens > 0 and math.isfinite(c.mean_logprob)):
            out[f"c/{c.id}"] = (c.mean_logprob * c.num_tokens, c.num_tokens)
    return out


@dataclass
class _Plan:
    """One backend's work: per member, the items to compute and the log-likelihoods reused from generation."""

    backend: Backend
    members: list[Member]
    todo: dict[str, list[Item]]  # member name → items computed by this backend (deduplicated across members)
    same_as: dict[str, dict[str, tuple]]  # member name → {item id: (ctx, cont) key} of every item it needs
    reused: dict[str, dict[str, tuple[float, int]]]
    texts: list[tuple[str, str]]  # texts to embed (id, text)

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.todo.values()) + len(self.texts)


def plan_groups(sc: ScoringConfig, members: list[Member], registry_root: Path | None) -> list[tuple[str, list]]:
    """(model, its members) per backend the scoring runs: the active members grouped by weights, then the embedding
    model (with no members when it is not a committee member's weights)."""
    groups: dict[str, list[Member]] = {}
    for m in members:
        if m.model is not None:
            groups.setdefault(m.model, []).append(m)
    groups.setdefault(embedding_weights(sc, members, registry_root), [])
    return list(groups.items())


def plan_scoring(sc: ScoringConfig, members: list[Member], prompts: dict[str, Prompt], completions: list[Completion],
                 generators: dict[str, dict], stack: contextlib.ExitStack, registry_root: Path | None,
                 backends: dict[str, Backend] | None = None, only: int | None = None) -> list[_Plan]:
    """Group the active members by weights (one backend each), and decide what each backend computes.
    `backends`: backends already opened by model (reused, and new ones added: one backend per model across the
    chunks of a streamed round); `only=i`: the i-th backend's plan alone."""
    embed_model = embedding_weights(sc, members, registry_root)
    plans = []
    for index, (model, group) in enumerate(plan_groups(sc, members, registry_root)):
        if only is not None and index != only:
            continue
        # a model only embedding may be a sentence embedder (its own backend); members run on the section's
        settings = sc.backend if group else embedding_settings(model, sc.backend)
        if backends is not None and model in backends:
            backend = backends[model]
        else:
            backend = stack.enter_context(load_backend(model, settings))
            if backends is not None:
                backends[model] = backend
        embeds = model == embed_model
        todo: dict[str, list[Item]] = {}
        same_as: dict[str, dict[str, tuple]] = {}
        reused: dict[str, dict[str, tuple[float, int]]] = {}
        seen: set[tuple] = set()
        for m in group:
            reused[m.name] = reusable(backend, m, completions, generators) if sc.reuse_generation_logprobs else {}
            todo[m.name], same_as[m.name] = [], {}
            for item_id, ctx, cont in build_requests(backend, prompts, completions, m.system):
                if item_id in reused[m.name]:
                    continue
                key = (tuple(ctx), tuple(cont))
                same_as[m.name][item_id] = key
                if key not in seen:
                    seen.add(key)
                    todo[m.name].append((item_id, ctx, cont, embeds and item_id.startswith("p/")))
        texts = [(f"c/{c.id}", c.text) for c in completions]
        if embeds and not group:  # an embedding model outside the committee: embed the prompt texts too
            texts += [(f"p/{pid}", p.text) for pid, p in prompts.items()]
        plans.append(_Plan(backend, group, todo, same_as, reused, texts if embeds else []))
    return plans


def score_prompts(
    sc: ScoringConfig, members: list[Member], prompts: dict[str, Prompt], completions: list[Completion], parts: Path,
    generators: dict[str, dict], registry_root: Path | None = None, bar=None, *,
    backends: dict[str, Backend] | None = None, stack: contextlib.ExitStack | None = None,
    only: int | None = None,
) -> dict:
    """Log-likelihoods under every active member, and embeddings, for these prompts and completions.

    Returns {"lls": {member: {item: (sum, n)}}, "embeddings": {item: vector}, "truncated": int,
    "reused": {member: count}, "timings": {model: {phase: seconds}}}. With `backends` (and the `stack` that closes
    them) the backends stay open for the next chunk of a streamed round, and `only=i` computes the i-th backend's
    work alone (the round streams model by model, so one engine runs at a time)."""
    lls: dict[str, dict[str, tuple[float, int]]] = {}
    emb: dict[str, np.ndarray] = {}
    truncated = 0
    timings: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as own:
        plans = plan_scoring(sc, members, prompts, completions, generators, stack or own, registry_root, backends,
                             only)
        if bar is not None and backends is None:
            bar.reset(total=sum(p.size for p in plans))
        for plan in plans:
            computed: dict[tuple, tuple[float, int]] = {}  # (ctx, cont) → result, shared by the plan's members
            computed_emb: dict[tuple, np.ndarray] = {}
            for m in plan.members:
                items = plan.todo[m.name]
                got, vecs, t = score_requests(plan.backend, items, parts, sc.batch_size, bar, sc.embed_max_tokens)
                truncated += t
                keys = plan.same_as[m.name]
                computed.update({keys[item_id]: value for item_id, value in got.items()})
                computed_emb.update({keys[item_id]: vec for item_id, vec in vecs.items()})
                lls[m.name] = {**plan.reused[m.name], **{i: computed[k] for i, k in keys.items()}}
                emb.update({i: computed_emb[k] for i, k in keys.items() if k in computed_emb})
            if plan.texts:
                emb.update(embed_texts(plan.backend, plan.texts, parts, sc.batch_size, bar, sc.embed_max_tokens))
            if backends is None:
                plan.backend.close()
            label = ", ".join(m.name for m in plan.members) or "embeddings"
            timings[f"{Path(plan.backend.model).name} ({label})"] = plan.backend.timings
    reused = {m: len(r) for plan in plans for m, r in plan.reused.items()}
    return {"lls": lls, "embeddings": emb, "truncated": truncated, "reused": reused, "timings": timings}


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


def compute_scores(
    prompts: dict[str, Prompt], completions: list[Completion], members: list[str],
    lls: dict[str, dict[str, tuple[float, int]]], emb: dict[str, np.ndarray], *, as_arrays: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Completion rows and prompt rows from per-member log-likelihoods and embeddings (`embedding` as a list, or
    with `as_arrays` the numpy vector, which `_table_with_embeddings` stores without a Python float per value)."""
    vector = (lambda v: v) if as_arrays else (lambda v: v.tolist())
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
        row["embedding"] = vector(emb[f"c/{c.id}"])
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
            "embedding": vector(emb[f"p/{pid}"]),
        })
    return comp_rows, prompt_rows


# --------------------------------------------------------------------------------------------------- step
CHUNK_PROMPTS = 2048  # prompts (with their completions) scored together: the unit a round streams through


def score_shard(work: list[tuple[dict, list[dict]]], *, config: dict, members: list[dict], parts: str,
                generators: dict[str, dict]) -> dict:
    """(prompt row, its completion rows) items → plain values (the in-memory form of one shard's scores)."""
    sc = from_dict(ScoringConfig, config)
    prompts = {row["id"]: Prompt.from_row(row) for row, _ in work}
    completions = [Completion.from_row(c) for _, rows in work for c in rows]
    out = score_prompts(sc, [Member(**m) for m in members], prompts, completions, Path(parts), generators)
    return {**out, "lls": {name: {k: list(v) for k, v in part.items()} for name, part in out["lls"].items()},
            "embeddings": {k: v.tolist() for k, v in out["embeddings"].items()}}


def prompt_groups(prompts_file: Path, completions_file: Path, *, comp_range: tuple[int, int] | None = None,
                  pool_range: tuple[int, int] | None = None, chunk: int = CHUNK_PROMPTS):
    """Chunks of about `chunk` prompts with their completions, streamed: ({prompt id: Prompt}, [Completion]) in
    pool order. `completions.parquet` is grouped by prompt in pool order (the generate step writes it so); the
    pool is merge-joined along it. Raises CurateError for a completion whose prompt is not in the pool."""
    from preference.plumbing.io import iter_row_range

    def pool_rows():
        lo, hi = pool_range or (0, count_rows(prompts_file))
        for table in iter_row_range(prompts_file, lo, hi):
            yield from table.to_pylist()

    def comp_rows():
        lo, hi = comp_range or (0, count_rows(completions_file))
        for table in iter_row_range(completions_file, lo, hi):
            yield from table.to_pylist()

    pool = pool_rows()
    prompts: dict[str, Prompt] = {}
    comps: list[Completion] = []
    current = None
    for row in comp_rows():
        pid = row["prompt_id"]
        if pid != current:
            if pid in prompts:
                raise CurateError(f"generate/completions.parquet is not grouped by prompt (prompt {pid} comes back "
                                  "after another prompt's completions); redo `curate generate --force`")
            if len(prompts) >= chunk:
                yield prompts, comps
                prompts, comps = {}, []
            for prow in pool:
                if prow["id"] == pid:
                    prompts[pid] = Prompt.from_row(prow)
                    break
            else:
                raise CurateError(f"completions point at prompts not in the pool (e.g. {pid}); redo "
                                  "`curate generate --force`")
            current = pid
        comps.append(Completion.from_row(row))
    if prompts:
        yield prompts, comps


def _in_memory_groups(prompts_file: Path, completions_file: Path, chunk: int = CHUNK_PROMPTS):
    """`prompt_groups` for a completions file of an earlier version (not grouped by prompt): read whole."""
    completions = [Completion.from_row(r) for r in read_rows(completions_file)]
    all_prompts = {row["id"]: Prompt.from_row(row) for row in read_rows(prompts_file)}
    missing = sorted({c.prompt_id for c in completions} - set(all_prompts))
    if missing:
        raise CurateError(f"{len(missing)} completions point at prompts not in the pool (e.g. {missing[0]}); "
                          "redo `curate generate --force`")
    by_prompt: dict[str, list[Completion]] = defaultdict(list)
    for c in completions:
        by_prompt[c.prompt_id].append(c)
    order = list(by_prompt)
    for start in range(0, len(order), chunk):
        ids = order[start : start + chunk]
        yield {pid: all_prompts[pid] for pid in ids}, [c for pid in ids for c in by_prompt[pid]]


def _table_with_embeddings(rows: list[dict], raw=None) -> pa.Table:
    """Rows (`embedding`: numpy vectors) → an Arrow table with `embedding` stored as list<float32>; the vectors are
    also appended to the open binary file `raw` (float32, row-major: the `.f32` beside the parquet)."""
    vectors = [row.pop("embedding") for row in rows]
    table = pa.Table.from_pylist(rows)
    flat = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors]) if vectors else \
        np.zeros(0, np.float32)
    if raw is not None:
        raw.write(flat.tobytes())
    offsets = np.concatenate([[0], np.cumsum([np.size(v) for v in vectors])]).astype(np.int32)
    return table.append_column(pa.field("embedding", pa.list_(pa.float32())),
                               pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32())))


EMBEDDING_FILES = {"completion_scores.parquet": "completion_embeddings.f32",
                   "prompt_scores.parquet": "prompt_embeddings.f32"}


def embedding_file(step, parquet_name: str) -> tuple[Path, int, int] | None:
    """(path, rows, dims) of the raw float32 copy of a finished score step's `embedding` column (same rows, same
    order; the manifest's `embedding_files`), for memory-mapped reads; None when the step has none (an earlier
    version)."""
    info = (step.manifest().get("embedding_files") or {}).get(parquet_name)
    if not info:
        return None
    path = step.path / info["file"]
    return (path, int(info["rows"]), int(info["dims"])) if path.is_file() else None


def memmap_embeddings(step, parquet_name: str) -> np.ndarray | None:
    """The score step's embeddings of `parquet_name` as a read-only memory map (no parse, pages read on use)."""
    found = embedding_file(step, parquet_name)
    if found is None:
        return None
    path, rows, dims = found
    if rows == 0 or dims == 0:
        return np.zeros((rows, dims), dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dims))


def gather_rows(mapped: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`mapped[rows]` for a memory map, read with positioned reads, one per run of consecutive rows. Indexing the
    map itself faults in the pages around every row touched (the kernel maps ~64 KB per fault): a scattered pick of
    60k rows from a 1M-row map would map gigabytes into the process."""
    rows = np.asarray(rows, dtype=np.int64)
    if not isinstance(mapped, np.memmap) or mapped.filename is None or not len(rows):
        return np.asarray(mapped[rows])
    width = mapped.shape[1] * mapped.itemsize
    out = np.empty((len(rows), mapped.shape[1]), dtype=mapped.dtype)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    buf = np.empty_like(out)
    with open(mapped.filename, "rb") as fh:
        at = 0
        for run in np.split(ordered, breaks):
            n = len(run)
            data = os.pread(fh.fileno(), n * width, mapped.offset + int(run[0]) * width)
            buf[at : at + n] = np.frombuffer(data, dtype=mapped.dtype).reshape(n, mapped.shape[1])
            at += n
    out[order] = buf
    return out


def score_range(ranges: list[dict], *, config: dict, members: list[dict], parts: str, generators: dict[str, dict],
                registry_root: str | None, prompts_file: str, completions_file: str, out_dir: str,
                progress: bool = False) -> dict:
    """Score one shard of the round (locally: the whole round; on Ray: a task reading its rows from shared
    storage) chunk by chunk, model by model: every backend but the last computes its requests for all chunks
    first (its results go to `parts/`, and one engine runs at a time), then one pass computes the last backend's
    and reads the others' from `parts/`, chunk by chunk, into this shard's two output files. What comes back is
    small (file paths and counts)."""
    from tqdm.auto import tqdm

    sc = from_dict(ScoringConfig, config)
    ((shard,),) = (ranges,)
    resolved = [Member(**m) for m in members]
    names = [m.name for m in resolved if m.model is not None]
    parts_dir, out = Path(parts), Path(out_dir)
    registry = Path(registry_root) if registry_root else None

    def groups():
        if shard.get("in_memory"):
            return _in_memory_groups(Path(prompts_file), Path(completions_file))
        return prompt_groups(Path(prompts_file), Path(completions_file), comp_range=tuple(shard["completions"]),
                             pool_range=tuple(shard["prompts"]))

    reused: dict[str, int] = {}
    truncated = 0
    files = {"completions": out / f"completion_scores-{shard['index']}.parquet",
             "prompts": out / f"prompt_scores-{shard['index']}.parquet"}
    counts = {"completions": 0, "prompts": 0}
    with contextlib.ExitStack() as stack:
        backends: dict[str, Backend] = {}
        first = next(iter(groups()), None)
        n_plans = len(plan_groups(sc, resolved, registry)) if first else 0
        bar = stack.enter_context(tqdm(total=shard["n_prompts"] * max(1, n_plans), desc="score", unit="prompt",
                                       disable=not progress))
        for index in range(n_plans - 1):  # earlier backends: compute everything into parts/, then close
            for prompts, comps in groups():
                score_prompts(sc, resolved, prompts, comps, parts_dir, generators, registry, backends=backends,
                              stack=stack, only=index)
                bar.update(len(prompts))
            backends[plan_groups(sc, resolved, registry)[index][0]].close()
        comp_out = stack.enter_context(RowWriter(files["completions"]))
        prompt_out = stack.enter_context(RowWriter(files["prompts"]))
        comp_raw = stack.enter_context(open(files["completions"].with_suffix(".f32"), "wb"))
        prompt_raw = stack.enter_context(open(files["prompts"].with_suffix(".f32"), "wb"))
        for prompts, comps in groups() if first else ():
            got = score_prompts(sc, resolved, prompts, comps, parts_dir, generators, registry, backends=backends,
                                stack=stack)
            truncated += got["truncated"]
            for name, count in got["reused"].items():
                reused[name] = reused.get(name, 0) + count
            comp_rows, prompt_rows = compute_scores(prompts, comps, names, got["lls"], got["embeddings"],
                                                     as_arrays=True)
            if comp_rows:
                comp_out.write_table(_table_with_embeddings(comp_rows, comp_raw))
                prompt_out.write_table(_table_with_embeddings(prompt_rows, prompt_raw))
            counts["completions"] += len(comp_rows)
            counts["prompts"] += len(prompt_rows)
            bar.update(len(prompts))
        timings = {}
        for model, group in plan_groups(sc, resolved, registry) if first else ():
            label = ", ".join(m.name for m in group) or "embeddings"
            timings[f"{Path(backends[model].model).name} ({label})"] = dict(backends[model].timings)
            backends[model].close()
    return {"files": {k: str(v) for k, v in files.items()}, "counts": counts, "truncated": truncated,
            "reused": reused, "timings": timings}


def score_shards(completions_file: Path, prompts_file: Path, num_shards: int) -> list[dict]:
    """Split the round into `num_shards` ranges of whole prompt groups: each range's completion rows and pool rows
    (one pass over the two files' id columns). A completions file that is not grouped by prompt (written by an
    earlier version) is one in-memory shard."""
    import pyarrow.compute as pc

    from preference.plumbing.io import iter_batches

    n_comp = count_rows(completions_file)
    if not n_comp:
        return []
    starts, pids = [], []  # first completion row of each prompt group, and its prompt id
    seen: set[str] = set()
    offset, last = 0, None
    for batch in iter_batches(completions_file, columns=["prompt_id"]):
        col = batch.column(0)
        values = col.to_pylist()
        change = np.flatnonzero(np.asarray(pc.not_equal(col.slice(1), col.slice(0, len(col) - 1))
                                           .to_numpy(zero_copy_only=False))) + 1 if len(col) > 1 else np.zeros(0, int)
        firsts = ([0] if values[0] != last else []) + change.tolist()
        for i in firsts:
            if values[i] in seen:
                return [{"index": 0, "in_memory": True, "n_prompts": len(seen)}]
            seen.add(values[i])
            starts.append(offset + i)
            pids.append(values[i])
        last = values[-1]
        offset += len(values)
    del seen
    # pool row of each group's prompt (the pool is in the same order)
    pool_rows = []
    want = iter(pids)
    target = next(want, None)
    offset = 0
    for batch in iter_batches(prompts_file, columns=["id"]):
        for i, pid in enumerate(batch.column(0).to_pylist(), offset):
            if pid == target:
                pool_rows.append(i)
                target = next(want, None)
        offset += batch.num_rows
    if len(pool_rows) != len(pids):
        raise CurateError(f"completions point at prompts not in the pool (e.g. {pids[len(pool_rows)]}); redo "
                          "`curate generate --force`")
    n = len(pids)
    bounds = [round(i * n / num_shards) for i in range(num_shards + 1)]
    shards = []
    for index, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        if b > a:
            shards.append({"index": index, "n_prompts": b - a,
                           "completions": [starts[a], starts[b] if b < n else n_comp],
                           "prompts": [pool_rows[a], pool_rows[b - 1] + 1]})
    return shards


def run_score(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Round step `score` (see the module docstring). Streams the round in chunks of prompts with their
    completions (bounded memory); with `sharding: {backend: ray}` each shard is scored on a worker, which writes
    its output files to the step's folder (shared storage), and the step concatenates them."""
    from training.registry import registry_root

    sc: ScoringConfig = cfg.scoring
    run = rnd.start_step("score", sc, inputs=(rnd.step("pool"), rnd.step("generate")), seeds={"seed": cfg.seed},
                         force=force)
    if run is None:
        return rnd.step("score").manifest()
    with run:
        run.extra["hardware"] = announce_hardware("score", sc.backend)
        generators = rnd.step("generate").manifest().get("generators") or {}
        prompts_file = rnd.step("pool").file("prompts.parquet")
        completions_file = rnd.step("generate").file("completions.parquet")
        registry = registry_root(cfg)
        members = resolve_committee(sc, registry)
        for m in members:
            if m.note:
                print(f"score: {m.note}", flush=True)
        names = [m.name for m in members if m.model is not None]
        sharded = sc.sharding.backend != "none"
        shards = score_shards(completions_file, prompts_file, sc.sharding.num_shards if sharded else 1)
        out_dir = run.parts_dir / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        results = map_shards(score_range, shards, sc.sharding, config=to_dict(sc), parts=str(run.parts_dir),
                             members=[asdict(m) for m in members], generators=generators,
                             registry_root=str(registry) if registry else None, prompts_file=str(prompts_file),
                             completions_file=str(completions_file), out_dir=str(out_dir),
                             progress=progress and not sharded)
        totals = {"completions": 0, "prompts": 0, "truncated": 0}
        reused: dict[str, int] = {}
        timings: dict[str, dict] = {}
        embedding_files = {}
        for name, kind in (("completion_scores.parquet", "completions"), ("prompt_scores.parquet", "prompts")):
            dims = 0
            with RowWriter(run.path / name) as out, atomic_path(run.path / EMBEDDING_FILES[name]) as tmp, \
                    open(tmp, "wb") as raw:
                for result in results:
                    for batch in iter_batches(result["files"][kind]):
                        out.write_table(pa.Table.from_batches([batch]))
                        if not dims and batch.num_rows and "embedding" in batch.schema.names:
                            dims = len(batch.column("embedding")[0])
                    Path(result["files"][kind]).unlink()
                    shard_raw = Path(result["files"][kind]).with_suffix(".f32")
                    with open(shard_raw, "rb") as fh:
                        shutil.copyfileobj(fh, raw)
                    shard_raw.unlink()
            embedding_files[name] = {"file": EMBEDDING_FILES[name], "rows": out.rows, "dims": dims}
        run.extra["embedding_files"] = embedding_files
        for shard, result in enumerate(results):
            totals["completions"] += result["counts"]["completions"]
            totals["prompts"] += result["counts"]["prompts"]
            totals["truncated"] += result["truncated"]
            for name, count in result["reused"].items():
                reused[name] = reused.get(name, 0) + count
            timings.update({(f"{k} (shard {shard})" if sharded else k): v for k, v in result["timings"].items()})
        if sharded:
            run.counts["shards"] = sc.sharding.num_shards
        run.counts.update({
            "completions": totals["completions"], "prompts": totals["prompts"], "members": len(names),
            "prompts_without_completions": count_rows(prompts_file) - totals["prompts"],
            "truncated_requests": totals["truncated"],
        })
        run.extra["committee"] = names
        run.extra["committee_notes"] = [m.note for m in members if m.note]
        run.extra["embedding_model"] = member_name(embedding_spec(sc, members))
        run.extra["reused"] = reused
        run.extra["timings"] = timings
        for name, spent in timings.items():
            print(f"score: {name}: {format_timings(spent)}", flush=True)
    return rnd.step("score").manifest()


__all__ = [
    "Member",
    "ScoringConfig",
    "champion_policy",
    "compute_scores",
    "prompt_backends",
    "embedding_weights",
    "member_name",
    "member_system",
    "merged_policy",
    "noisy_variant",
    "parse_member",
    "resolve_committee",
    "resolve_member",
    "run_score",
    "semantic_spread",
    "vote_entropy",
]
