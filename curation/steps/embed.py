"""Step `embed` (round 0): the imported pairs' answers embedded as `curate score` embeds a completion, so round 1's
fast reward ensemble can fit on them."""

from __future__ import annotations

from curation.steps.labels import messages_text
from preference.plumbing.io import write_rows


def run_embed(cfg, rnd, *, force: bool = False, progress: bool = True) -> dict:
    """Step `embed` of round 0: the imported pairs' answers embedded as `curate score` embeds a completion (its
    text alone, by `scoring.embedding_model`) → `embed/completion_scores.parquet` (completion_id, embedding), for
    at most `labels.embed_pairs` pairs (a seeded sample). Round 1's selection fits its fast Bradley–Terry reward
    ensemble on earlier rounds' pairs with these embeddings (`curation.steps.select.earlier_pairs`): with a one-head
    champion (`reward.ensemble: 1`), `selection.reward_source: auto` takes that ensemble's disagreement. Skipped
    (with a note) when the embedding model is a language model: the score step embeds a completion after its
    prompt there, which the imported answers cannot match."""
    import numpy as np
    from tqdm.auto import tqdm

    from curation.backends import embedding_settings, load_backend
    from curation.steps.score import embed_texts, resolve_member
    from training.data import load_round_pairs
    from training.registry import registry_root

    sc, n = cfg.scoring, cfg.labels.embed_pairs
    key = {"embedding_model": sc.embedding_model, "backend": sc.backend, "embed_pairs": n,
           "embed_max_tokens": sc.embed_max_tokens}
    run = rnd.start_step("embed", key, inputs=(rnd.step("labels"),), seeds={"seed": cfg.seed}, force=force)
    if run is None:
        return rnd.step("embed").manifest()
    with run:
        pairs = load_round_pairs(rnd)
        weights = resolve_member(sc.embedding_model, sc.backend.name, registry_root(cfg)) if sc.embedding_model \
            else None
        settings = embedding_settings(weights, sc.backend) if weights is not None else None
        rows: list[dict] = []
        if n == 0 or not pairs or settings is None or settings.name != "sentence-transformers":
            run.extra["note"] = ("labels.embed_pairs is 0" if n == 0 else "no imported pairs" if not pairs else
                                 "scoring.embedding_model is not a sentence embedder: round 1's fast reward ensemble "
                                 "cannot use the imported pairs (a multi-head champion, reward.ensemble ≥ 2, can)")
        else:
            rng = np.random.default_rng([cfg.seed, 0xE3BED])
            sample = [pairs[i] for i in sorted(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False))]
            texts = {}
            for p in sample:
                texts.setdefault(p.chosen_id, messages_text(p.chosen))
                texts.setdefault(p.rejected_id, messages_text(p.rejected))
            bar = tqdm(total=len(texts), desc="embed imported answers", unit="text", disable=not progress)
            with load_backend(weights, settings) as backend:
                vectors = embed_texts(backend, sorted(texts.items()), run.parts_dir, sc.batch_size, bar,
                                      sc.embed_max_tokens)
                run.extra["timings"] = backend.timings
            bar.close()
            rows = [{"completion_id": cid, "embedding": vectors[cid].astype(np.float32).tolist()} for cid in texts]
            run.extra["embedding_model"] = str(sc.embedding_model)
        import pyarrow as pa

        schema = pa.schema([("completion_id", pa.string()), ("embedding", pa.list_(pa.float32()))])
        write_rows(run.path / "completion_scores.parquet", rows, schema=schema)
        run.counts.update(pairs=len(pairs) if rows else 0, texts=len(rows))
    return rnd.step("embed").manifest()


__all__ = ["run_embed"]
