"""`curate drift`: has the traffic moved away from what the champion was trained on? Should a round start?

Compares the recent served prompts (the traffic log's responses that no round's pool has ingested yet, at most
`drift.window` of the latest) with the champion's training prompts (the prompts of the preference pairs in its
registry lineage; `drift.reference: pool` uses the pool of the round that produced it instead):

- **embeddings** (the scoring model's, `scoring.embedding_model` or the first committee member, through
  `curation.backends`): a kernel two-sample test — the unbiased MMD² with a Gaussian kernel (median-distance
  bandwidth) on L2-normalized embeddings, with a permutation p-value (`drift.permutations` seeded label
  shuffles). Run on all traffic and on every traffic slice (`metadata.slice` of the requests) with at least
  `min_slice_samples` prompts; a slice is compared with the reference prompts of the same slice when there are
  enough of them, else with all. The tests share the false-alarm budget `alpha` (Bonferroni), and each runs
  at least 2 / (its share of alpha) permutations so that its p-value can get below that share.
- **perplexity**: each prompt's perplexity under the scoring model; drift when the traffic's median is at least
  `perplexity_ratio` × the reference's and a one-sided Mann–Whitney test is significant at `alpha`.
- **thumbs down**: the share of rated new answers rated down; an alarm when it reaches `thumbs_down_rate`, or
  when it rises by `thumbs_down_increase` over earlier (already ingested) traffic with a one-sided Fisher test
  significant at `alpha` — both only with at least `min_feedback` ratings. Separately, `feedback_trigger` new
  thumbs-down answers warrant a round by themselves (there is new error-based data to label), drift or not.

Writes `<project>/drift/<UTC time>/drift.json` (every number above, the thresholds, `alarm`, `start_round` and
the reasons) and `drift.png` (embedding PCA, the permutation null with the observed statistic, perplexities).

Why not a drift library: the maintained ones do not install beside the pinned stack (frouros 0.9 needs
numpy<2.2, scipy<1.15 and matplotlib<3.10; alibi-detect 0.13 needs transformers<5 and numpy<2); torchdrift
installs but has had no release since 2021; hyppo (a hypothesis-testing library) installs, but its permutation
MMD recomputes the statistic per permutation from scratch (~1.8 s for 140 samples × 500 permutations here, vs
milliseconds for `mmd_test`'s precomputed-kernel permutations) and seeds numpy's global state. `mmd_test` is
~40 lines, takes an explicit `np.random.Generator`, and its calibration is tested (tests/test_drift.py).

`curate round run --next --if-drift` runs this check and starts the next round only when `start_round` is true;
exit codes for cron: 0 = a round ran to its end, 11 = a round ran and waits for reviewers, 10 = no drift and no
feedback to act on (nothing done), 2 = an error (one line on stderr).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np

from preference.plumbing.errors import CurateError
from preference.plumbing.io import atomic_path, read_rows, write_json
from preference.schema import prompt_text

EXIT_ROUND_RAN = 0
EXIT_NO_DRIFT = 10
EXIT_WAITING = 11


@dataclass
class DriftConfig:
    """`drift:` section: what counts as drift, and when the loop starts a round."""

    traffic: Path | None = None  # traffic log (folder or file); null = the serve folder's traffic/
    reference: Literal["trained", "pool"] = "trained"  # the champion's training prompts, or its round's pool
    window: int = 500  # compare at most this many of the latest new served prompts
    min_samples: int = 30  # fewer new prompts (or reference prompts) → no test, "not enough traffic"
    max_reference: int = 1000  # reference prompts beyond this are subsampled (seeded)
    alpha: float = 0.01  # false-alarm budget shared by the overall and per-slice tests (Bonferroni)
    permutations: int = 1000
    min_slice_samples: int = 20  # slices with fewer traffic prompts get no test of their own
    perplexity_ratio: float = 1.5  # drift: median traffic prompt perplexity ≥ ratio × the reference's (significant)
    thumbs_down_rate: float = 0.5  # alarm: this share of rated new answers is rated down ...
    thumbs_down_increase: float = 0.15  # ... or the share rose by this much over earlier traffic (significant)
    min_feedback: int = 10  # ratings needed before thumbs-down rates are judged
    feedback_trigger: int | None = 25  # this many new thumbs-down answers start a round by themselves; null = never
    seed: int | None = None  # null = the round config's seed

    def __post_init__(self):
        for key in ("window", "min_samples", "max_reference", "permutations", "min_slice_samples", "min_feedback"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.perplexity_ratio < 1:
            raise ValueError(f"perplexity_ratio must be ≥ 1, got {self.perplexity_ratio}")
        if not 0 < self.thumbs_down_rate <= 1 or not 0 < self.thumbs_down_increase <= 1:
            raise ValueError("thumbs_down_rate and thumbs_down_increase must be in (0, 1]")
        if self.feedback_trigger is not None and self.feedback_trigger < 1:
            raise ValueError(f"feedback_trigger must be ≥ 1 or null, got {self.feedback_trigger}")


# ---------------------------------------------------------------------------------------------- statistics
@dataclass
class MMDResult:
    mmd2: float  # unbiased MMD² estimate; ≈ 0 (can be < 0) for the same distribution, higher = more different
    p_value: float  # permutation p-value, (1 + #{permuted ≥ observed}) / (1 + permutations)
    bandwidth: float  # Gaussian kernel σ (median pairwise distance of the pooled sample)
    null: np.ndarray  # the permuted statistics


def mmd_test(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, permutations: int = 1000) -> MMDResult:
    """Kernel two-sample test of x (n, d) vs y (m, d): unbiased MMD² with a Gaussian kernel on L2-normalized
    rows, σ = the median pairwise distance of the pooled sample, p-value from `permutations` label shuffles."""
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"mmd_test needs at least 2 samples on each side, got {n} and {m}")
    z = np.concatenate([x, y]).astype(np.float64)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    sq = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2 * z @ z.T, 0.0)
    off = sq[np.triu_indices(n + m, 1)]
    sigma2 = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    k = np.exp(-sq / (2 * sigma2))
    total, rowsum = k.sum(), k.sum(1)

    def stats(a: np.ndarray) -> np.ndarray:  # a: (p, n+m) 0/1 indicators of the "x" side
        s_xx = ((a @ k) * a).sum(1)
        s_x1 = a @ rowsum
        s_yy = total - 2 * s_x1 + s_xx
        s_xy = s_x1 - s_xx
        return (s_xx - n) / (n * (n - 1)) + (s_yy - m) / (m * (m - 1)) - 2 * s_xy / (n * m)  # diag(k) = 1

    labels = np.zeros(n + m)
    labels[:n] = 1.0
    observed = float(stats(labels[None])[0])
    null = []
    chunk = max(1, 2_000_000 // (n + m))  # permutations per matrix product (bounded memory)
    for start in range(0, permutations, chunk):
        size = min(chunk, permutations - start)
        null.append(stats(rng.permuted(np.tile(labels, (size, 1)), axis=1)))
    null_arr = np.concatenate(null) if null else np.zeros(0)
    p = (1 + int((null_arr >= observed).sum())) / (1 + len(null_arr))
    return MMDResult(observed, p, float(np.sqrt(sigma2)), null_arr)


def embedding_tests(traffic: np.ndarray, traffic_slices: list[str], reference: np.ndarray,
                    reference_slices: list[str], cfg: DriftConfig, rng: np.random.Generator) -> dict:
    """The overall and per-slice MMD tests, Bonferroni-corrected (see the module docstring)."""
    t_slices, r_slices = np.asarray(traffic_slices, dtype=object), np.asarray(reference_slices, dtype=object)
    per_slice = {}  # slice → (traffic mask, reference mask, kind); skipped when it would repeat the overall test
    for name in sorted(set(traffic_slices)):
        t_mask, r_mask = t_slices == name, r_slices == name
        if t_mask.sum() < cfg.min_slice_samples:
            continue
        kind = "slice" if r_mask.sum() >= cfg.min_slice_samples else "all"
        if kind == "all":
            r_mask = np.ones(len(r_slices), dtype=bool)
        if not (t_mask.all() and r_mask.all()):
            per_slice[name] = (t_mask, r_mask, kind)
    alpha_each = cfg.alpha / (1 + len(per_slice))
    # the smallest permutation p-value is 1/(1+P): make sure a test can reach its share of alpha
    permutations = max(cfg.permutations, math.ceil(2 / alpha_each))

    def one(t: np.ndarray, r: np.ndarray, reference_kind: str) -> dict:
        res = mmd_test(t, r, rng, permutations)
        return {"n_traffic": len(t), "n_reference": len(r), "reference": reference_kind, "mmd2": res.mmd2,
                "p_value": res.p_value, "bandwidth": res.bandwidth, "drift": res.p_value < alpha_each,
                "_null": res.null}

    out = {"test": "MMD² (unbiased), Gaussian kernel on L2-normalized embeddings, permutation p-value",
           "alpha": cfg.alpha, "tests": 1 + len(per_slice), "alpha_per_test": alpha_each,
           "permutations": permutations,
           "overall": one(traffic, reference, "all"), "slices": {}}
    for name, (t_mask, r_mask, kind) in per_slice.items():
        out["slices"][name] = one(traffic[t_mask], reference[r_mask], kind)
    return out


def perplexity_shift(traffic: np.ndarray, reference: np.ndarray, cfg: DriftConfig) -> dict:
    """Median prompt perplexity ratio (traffic / reference) and a one-sided Mann–Whitney test (traffic higher)."""
    from scipy.stats import mannwhitneyu

    t, r = np.asarray(traffic, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    ratio = float(np.exp(np.median(t) - np.median(r)))  # inputs are log-perplexities
    p = float(mannwhitneyu(t, r, alternative="greater").pvalue)
    return {"median_traffic": float(np.exp(np.median(t))), "median_reference": float(np.exp(np.median(r))),
            "ratio": ratio, "p_value": p, "drift": bool(ratio >= cfg.perplexity_ratio and p < cfg.alpha)}


def thumbs_down_shift(recent: list[str], earlier: list[str], cfg: DriftConfig) -> dict:
    """Thumbs-down rates of new vs earlier rated answers (ratings "up"/"down"), and whether they alarm."""
    from scipy.stats import fisher_exact

    n, down = len(recent), sum(r == "down" for r in recent)
    n0, down0 = len(earlier), sum(r == "down" for r in earlier)
    rate = down / n if n else None
    base = down0 / n0 if n0 else None
    out = {"rated": n, "thumbs_down": down, "rate": rate, "earlier_rated": n0, "earlier_rate": base,
           "p_value": None, "alarm": False, "reason": ""}
    if n < cfg.min_feedback:
        out["reason"] = f"{n} ratings, fewer than min_feedback={cfg.min_feedback}"
        return out
    if rate >= cfg.thumbs_down_rate:
        out["alarm"], out["reason"] = True, f"thumbs-down rate {rate:.2f} ≥ {cfg.thumbs_down_rate}"
    if n0 >= cfg.min_feedback:
        p = float(fisher_exact([[down, n - down], [down0, n0 - down0]], alternative="greater").pvalue)
        out["p_value"] = p
        if rate - base >= cfg.thumbs_down_increase and p < cfg.alpha:
            out["alarm"] = True
            out["reason"] = f"thumbs-down rate rose from {base:.2f} to {rate:.2f} (p={p:.2g})"
    return out


# --------------------------------------------------------------------------------------------------- inputs
@dataclass
class Sample:
    text: str
    slice: str


def reference_prompts(cfg) -> tuple[str, list[Sample]]:
    """(champion version, its training prompts) — see `DriftConfig.reference`. A champion of round 0 (the
    bootstrap) was trained on imported labels: their prompts are its reference either way."""
    from preference.plumbing.store import Project
    from training.data import pairs_step
    from training.registry import Registry, registry_root

    registry = Registry(registry_root(cfg))
    version = registry.champion()
    if version is None:
        raise CurateError(f"no champion in the registry {registry.root}: there is no model whose training prompts "
                          "traffic could drift from; run rounds (without --if-drift) until the gate promotes one")
    project = Project(cfg.project)
    samples: dict[str, Sample] = {}
    number = registry.get(version).get("round")
    if cfg.drift.reference == "pool" and number != 0:  # round 0 (the bootstrap) has no pool: its labels' prompts
        from curation.steps.pool import load_prompts

        if number is None or number not in project.rounds():
            raise CurateError(f"champion {version} names no round of {project.root}; use drift.reference: trained")
        for p in load_prompts(project.round(number)):
            samples[p.id] = Sample(p.text, p.slice)
        return version, list(samples.values())
    lineage = read_json_if(registry.path(version) / "lineage.json")
    wanted: dict[int, set[str]] = {}
    for part in lineage.values():  # one entry per trained artifact: {"rounds": {"round-N": [pair ids]}, ...}
        for key, ids in ((part.get("rounds") if isinstance(part, dict) else None) or {}).items():
            wanted.setdefault(int(key.removeprefix("round-")), set()).update(ids)
    for number, ids in sorted(wanted.items()):
        step = pairs_step(project.round(number)) if number in project.rounds() else None
        if step is None or not step.done:
            raise CurateError(f"champion {version} was trained on pairs of round {number}, which {project.root} does "
                              "not hold; run drift with the config of the project that trained it")
        for row in read_rows(step.file("pairs.parquet")):
            if row["id"] in ids and row["prompt_id"] not in samples:
                samples[row["prompt_id"]] = Sample(prompt_text(row["prompt"]), row.get("slice") or "default")
    if not samples:
        raise CurateError(f"champion {version}'s lineage names no training pairs; use drift.reference: pool")
    return version, list(samples.values())


def read_json_if(path: Path) -> dict:
    from preference.plumbing.io import read_json

    return read_json(path) if path.is_file() else {}


def scoring_backends(cfg):
    """(embedder, scorer) as `curate score` embeds prompts and scores their perplexity (`scoring.embedding_model`,
    else the first committee member; `curation.steps.score.prompt_backends`), as a context manager, on the backend's
    `small_jobs` one where it has one (transformers in place of vLLM: a few hundred prompts need no engine).
    `scorer` is None when the embedder scores too."""
    from dataclasses import replace

    from curation.backends import backend_class
    from curation.steps.score import prompt_backends
    from training.registry import registry_root

    sc = cfg.scoring
    lighter = backend_class(sc.backend.name).small_jobs
    if lighter is not None:
        sc = replace(sc, backend=replace(sc.backend, name=lighter))
    return prompt_backends(sc, registry_root(cfg))


def _requests(backend, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """Each text read after one end-of-text token (how `curate score` reads a prompt's text)."""
    from curation.backends import fit_request

    out = []
    for text in texts:
        ctx, cont, _ = fit_request([backend.eos_token_id], backend.encode(text) or [backend.eos_token_id],
                                   backend.max_model_len)
        out.append((ctx, cont))
    return out


def embed_and_score(backend, traffic: list[str], reference: list[str], progress: bool, batch: int = 32,
                    max_tokens: int = 512, scorer=None):
    """(traffic embeddings, traffic log-perplexities, reference embeddings, reference log-perplexities), each
    text's embedding (over its first `max_tokens` tokens, as `curate score` embeds prompts) and log-perplexity:
    from one forward pass (`Backend.loglikelihood_and_embed`), or, when a `scorer` is given (the embedder is a
    sentence embedder), the embedding from `backend` and the log-perplexity from `scorer`."""
    from tqdm.auto import tqdm

    texts = traffic + reference
    emb, ppl = [], []
    with tqdm(total=len(texts), desc="drift", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            if scorer is None:
                lls, vecs = backend.loglikelihood_and_embed(_requests(backend, chunk), max_tokens)
            else:
                lls, vecs = scorer.loglikelihood(_requests(scorer, chunk)), backend.embed(chunk, max_tokens)
            emb.append(vecs)
            ppl.append(np.array([-float(np.mean(ll)) for ll in lls]))
            bar.update(len(chunk))
    emb_all, ppl_all = np.concatenate(emb), np.concatenate(ppl)
    n = len(traffic)
    return emb_all[:n], ppl_all[:n], emb_all[n:], ppl_all[n:]


# ------------------------------------------------------------------------------------------------- the check
def check(cfg, *, progress: bool = True, echo=print) -> tuple[dict, Path]:
    """Run the drift check for a round config; returns (the report, its folder)."""
    from curation.serving.serve import traffic_dir
    from curation.serving.traffic import new_responses, read_traffic, seen_traffic
    from preference.plumbing.store import Project

    d: DriftConfig = cfg.drift
    seed = cfg.seed if d.seed is None else d.seed
    rng = np.random.default_rng(seed)
    project = Project(cfg.project)
    log_path = Path(d.traffic) if d.traffic else traffic_dir(cfg)
    log = read_traffic(log_path)
    seen = seen_traffic(project.round(n) for n in project.rounds())
    new = new_responses(log, seen)
    recent = new[-d.window :]
    earlier_ratings = [r.rating for r in log.responses.values() if r.id in seen.responses and r.rating]
    version, reference = reference_prompts(cfg)
    if len(reference) > d.max_reference:
        reference = [reference[i] for i in sorted(rng.choice(len(reference), d.max_reference, replace=False))]
    report: dict = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"), "champion": version,
        "traffic": {"log": str(log_path), **log.counts(), "new_responses": len(new), "compared": len(recent),
                    "corrupt_examples": [f"{w}: {r}" for w, r in log.corrupt[:5]]},
        "reference": {"kind": d.reference, "prompts": len(reference)},
        "thresholds": {k: getattr(d, k) for k in ("alpha", "permutations", "min_samples", "min_slice_samples",
                                                   "perplexity_ratio", "thumbs_down_rate", "thumbs_down_increase",
                                                   "min_feedback", "feedback_trigger", "window")},
        "seed": seed,
    }
    reasons: list[str] = []
    null = None
    texts = [prompt_text(r.messages) for r in recent]
    if len(recent) < d.min_samples or len(reference) < d.min_samples:
        report["embedding"] = report["perplexity"] = None
        report["note"] = (f"not enough prompts to test ({len(recent)} new served, {len(reference)} reference; "
                          f"min_samples={d.min_samples})")
        emb_t = emb_r = ppl_t = ppl_r = None
    else:
        echo(f"drift: {len(recent)} new served prompts vs {len(reference)} prompts champion {version} trained on")
        with scoring_backends(cfg) as (embedder, scorer):
            emb_t, ppl_t, emb_r, ppl_r = embed_and_score(embedder, texts, [s.text for s in reference], progress,
                                                         max_tokens=cfg.scoring.embed_max_tokens, scorer=scorer)
        report["embedding"] = embedding_tests(emb_t, [r.slice or "untagged" for r in recent], emb_r,
                                              [s.slice for s in reference], d, rng)
        null = report["embedding"]["overall"].pop("_null")
        for part in report["embedding"]["slices"].values():
            part.pop("_null")
        report["perplexity"] = perplexity_shift(ppl_t, ppl_r, d)
        emb = report["embedding"]
        if emb["overall"]["drift"]:
            reasons.append(f"prompt embeddings drifted (MMD² {emb['overall']['mmd2']:.4g}, "
                           f"p={emb['overall']['p_value']:.3g} < {emb['alpha_per_test']:.3g})")
        reasons += [f"slice {name} drifted (p={s['p_value']:.3g})" for name, s in emb["slices"].items() if s["drift"]]
        if report["perplexity"]["drift"]:
            reasons.append(f"prompt perplexity rose {report['perplexity']['ratio']:.2f}×")
    thumbs = thumbs_down_shift([r.rating for r in recent if r.rating], earlier_ratings, d)
    report["thumbs_down"] = thumbs
    if thumbs["alarm"]:
        reasons.append(thumbs["reason"])
    report["alarm"] = bool(reasons)
    new_down = sum(r.rating == "down" for r in new)
    if d.feedback_trigger is not None and new_down >= d.feedback_trigger:
        reasons.append(f"{new_down} new thumbs-down answers (feedback_trigger={d.feedback_trigger})")
    report["start_round"] = bool(reasons)
    report["reasons"] = reasons
    folder = project.root / "drift" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "drift.json", report)
    if emb_t is not None:
        plot(folder / "drift.png", emb_t, emb_r, null, report, ppl_t, ppl_r)
    return report, folder


def plot(path: Path, emb_t, emb_r, null, report: dict, ppl_t, ppl_r) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.concatenate([emb_r, emb_t]).astype(np.float64)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    z -= z.mean(0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    xy = z @ vt[:2].T
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].scatter(*xy[: len(emb_r)].T, s=8, alpha=0.5, label=f"trained on ({len(emb_r)})")
    axes[0].scatter(*xy[len(emb_r) :].T, s=8, alpha=0.5, label=f"new traffic ({len(emb_t)})")
    axes[0].set_title("prompt embeddings (PCA)")
    axes[0].legend()
    overall = report["embedding"]["overall"]
    axes[1].hist(null, bins=40, color="grey", alpha=0.7, label="permutation null")
    axes[1].axvline(overall["mmd2"], color="red", label=f"observed (p={overall['p_value']:.3g})")
    axes[1].set_title("MMD² two-sample test")
    axes[1].legend()
    bins = np.linspace(min(ppl_t.min(), ppl_r.min()), max(ppl_t.max(), ppl_r.max()), 30)
    axes[2].hist(ppl_r, bins=bins, alpha=0.5, density=True, label="trained on")
    axes[2].hist(ppl_t, bins=bins, alpha=0.5, density=True, label="new traffic")
    axes[2].set_title(f"prompt log-perplexity (median ratio {report['perplexity']['ratio']:.2f}×)")
    axes[2].legend()
    fig.suptitle(f"drift vs champion {report['champion']}: " + ("; ".join(report["reasons"]) or "no alarm"),
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def summary(report: dict) -> str:
    """One line for the terminal."""
    if report["start_round"]:
        return "drift: a round is warranted: " + "; ".join(report["reasons"])
    why = report.get("note") or "no drift, no thumbs-down alarm"
    return f"drift: nothing to do ({why}; {report['traffic']['new_responses']} new served responses)"


__all__ = ["DriftConfig", "EXIT_NO_DRIFT", "EXIT_ROUND_RAN", "EXIT_WAITING", "check", "embedding_tests",
           "mmd_test", "perplexity_shift", "summary", "thumbs_down_shift"]
