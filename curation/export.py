"""`curate export`: the curated preference data as a dataset others can load, train on and cite.

    curate export -c configs/demo.yaml --out exports/demo [--rounds 0-3] [--force] [--push-to-hub org/name]

Every selected round's pairs (round 0: the imported seed labels; loop rounds: `pull/pairs.parquet`) and unpaired
judgements (traffic thumbs up/down, imported unpaired labels), deduplicated — the same prompt and the same two
answers (text) once: the latest round's judgement wins —, split into train/test by a hash of the prompt (all pairs
of a prompt in one split; `export.test_share`), in TRL's conversational preference format plus provenance columns
(`PAIR_COLUMNS`):

    out/
      README.md                   the dataset card (huggingface_hub `DatasetCard`; YAML metadata valid for the Hub:
                                  licence from the sources, task categories, size category, configs)
      dataset_dict.json train/ test/        the pairs as an HF DatasetDict (`datasets.load_from_disk(out)`)
      data/pairs/{train,test}.parquet       the same rows as parquet (`load_dataset("parquet", data_files=…)`,
                                            and `load_dataset(out)` / the Hub through the card's `configs`)
      unpaired/ (+ data/unpaired/*.parquet) the unpaired judgements (TRL's unpaired format: prompt, completion,
                                            label; KTO), when there are any
      export.json                           what was exported: rounds, counts, the project, the time

TRL's `DPOTrainer` and `RewardTrainer` take the pairs as they are (tested); note that `RewardTrainer` uses a
`margin` column in its loss when the dataset has one (`remove_columns("margin")` otherwise).

The card states the sources and their licences (pool sources' and label sources' `license`, `unknown` when a
source names none), the models (generator, scoring committee, embedder, reward-model and policy bases, the registry
versions that made reviewers' suggestions), the selection strategy of each round, reviewer counts and agreement
(Kendall τ, Krippendorff α) per round, harm-flag rates per label, and the known limitations that follow from how
the data was made (simulated reviewers, small rounds, model-written answers, imported labels, contradicting pairs).

`--push-to-hub REPO` uploads README.md and the parquet files (not the arrow copies) with `huggingface_hub`
(`HfApi.create_repo` + `upload_folder`); the token comes from `HF_TOKEN` or `huggingface-cli login`, and the Hub
must be reachable (`HF_HUB_OFFLINE=0`: the tool sets it to 1 by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, read_jsonl, read_rows, write_json
from preference.schema import PreferencePair, Response

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "id", "prompt_id", "round", "stage", "source", "slice", "strategy",
                "arm", "random_arm", "annotator_count", "annotators", "agreement", "chosen_harm", "rejected_harm",
                "rejected_harmful", "margin", "chosen_id", "rejected_id")
UNPAIRED_COLUMNS = ("prompt", "completion", "label", "id", "prompt_id", "round", "source", "model_version",
                    "comment")
SPLITS = ("train", "test")


@dataclass
class ExportConfig:
    """`export:` section (`curate export`): what the dataset card says beyond what the project knows."""

    pretty_name: str | None = None  # the card's title (default: the project folder's name)
    language: list[str] = field(default_factory=list)  # ISO 639-1 codes of the texts, e.g. [en]
    license: str | None = None  # overrides the licence read from the sources (an SPDX id, or "other")
    test_share: float = 0.1  # share of prompts (by hash) in the test split
    tags: list[str] = field(default_factory=lambda: ["dpo", "rlhf", "preference", "human-feedback", "trl"])
    limitations: list[str] = field(default_factory=list)  # further known limitations, one sentence each

    def __post_init__(self):
        if not 0.0 <= self.test_share < 1.0:
            raise ValueError(f"test_share must be in [0, 1), got {self.test_share}")


# --------------------------------------------------------------------------------------------------- helpers
def parse_rounds(spec: str | None) -> list[int] | None:
    """`--rounds`: None/"all" = every round; "0-3", "1,2,5", "2" otherwise."""
    if spec is None or spec.strip().lower() == "all":
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError(part)
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError as exc:
        raise CurateError(f"--rounds {spec!r}: expected all, a round (2), a range (0-3) or a list (1,2,5)") from exc
    if not out or min(out) < 0:
        raise CurateError(f"--rounds {spec!r}: expected round numbers ≥ 0 (0 = the bootstrap)")
    return sorted(out)


def split_of(prompt: list[dict[str, str]], test_share: float) -> str:
    """train or test by a hash of the prompt's content (whitespace-normalized): stable across exports."""
    from training.data import prompt_key

    h = int(hashlib.sha256(prompt_key(prompt).encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "test" if h < test_share else "train"


def size_category(n: int) -> str:
    """The Hub's `size_categories` value for n rows."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "10M<n<100M"


def _answer(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def _responses(step, name: str) -> list[Response]:
    path = step.path / name
    return [Response.from_row(r) for r in read_jsonl(path)] if step.done and path.is_file() else []


def harm_votes(pull, harm_vote: float) -> dict[str, dict[str, list[str]]]:
    """record id → completion id → the harm labels at least `harm_vote` of its reviewers ticked (the review
    stage's answers replace the first stage's for a reviewed record)."""
    by_record: dict[str, list[Response]] = defaultdict(list)
    for r in _responses(pull, "responses.jsonl"):
        if r.status == "submitted":
            by_record[r.record_id].append(r)
    reviewed: dict[str, list[Response]] = defaultdict(list)
    for r in _responses(pull, "review_responses.jsonl"):
        if r.status == "submitted" and r.harm:
            reviewed[r.record_id].append(r)
    by_record.update(reviewed)
    out: dict[str, dict[str, list[str]]] = {}
    for rid, items in by_record.items():
        judged = [r for r in items if r.harm]
        if not judged:
            continue
        votes: dict[str, Counter] = defaultdict(Counter)
        for r in judged:
            for cid, labels in r.harm.items():
                votes[cid].update(set(labels))
        out[rid] = {cid: sorted(lab for lab, n in c.items() if n / len(judged) >= harm_vote)
                    for cid, c in votes.items()}
    return out


# --------------------------------------------------------------------------------------------------- collect
@dataclass
class Collected:
    pairs: list[dict] = field(default_factory=list)  # PAIR_COLUMNS rows
    unpaired: list[dict] = field(default_factory=list)  # UNPAIRED_COLUMNS rows
    rounds: list[dict] = field(default_factory=list)  # per round: what the card says about it
    duplicates: int = 0
    contradictions: int = 0
    harm: dict[str, Counter] = field(default_factory=lambda: {"judged": Counter(), "flagged": Counter()})


def _round_info(r, cfg) -> dict[str, Any]:
    """What the card says about one round: where its pairs came from, its selection, reviewers and models."""
    info: dict[str, Any] = {"round": r.number}
    if r.number == 0:
        labels = r.step("labels").manifest()
        info.update(kind="imported", sources=labels.get("sources", []), counts=labels.get("counts", {}))
    else:
        info["kind"] = "loop"
        if r.step("select").done:
            m = r.step("select").manifest()
            sel = (m.get("config") or {}).get("selection") or {}
            info["selection"] = {"strategy": sel.get("strategy"), "k": sel.get("k"),
                                 "random_share": sel.get("random_share"),
                                 "completion_choice": sel.get("completion_choice"),
                                 "reward_signals": m.get("reward_signals"), "counts": m.get("counts", {})}
        pull = r.step("pull").manifest()
        ann = ((pull.get("config") or {}).get("annotation") or {})
        counts = pull.get("counts", {})
        info["reviewers"] = {"backend": ann.get("backend"), "simulated": bool(ann.get("simulate_reviewers"))
                             or ann.get("backend") == "simulated",
                             "annotators": counts.get("annotators"), "records": counts.get("records"),
                             "submitted": counts.get("submitted"), "routed_to_review": counts.get("routed_to_review"),
                             "kendall_tau": (pull.get("agreement") or {}).get("kendall_tau_mean"),
                             "harm_alpha": (pull.get("agreement") or {}).get("harm_alpha_nominal")}
        if r.step("generate").done:
            gen = (r.step("generate").manifest().get("config") or {})
            info["generation"] = {"models": gen.get("models"), "n": gen.get("n"),
                                  "include_references": gen.get("include_references")}
        if r.step("score").done:
            sc = (r.step("score").manifest().get("config") or {})
            info["scoring"] = {"committee": sc.get("committee"), "embedding_model": sc.get("embedding_model")}
        if r.step("push").done:
            info["suggestions_by"] = (r.step("push").manifest().get("reward_model"))
    trained = {}
    from training.trainers import TRAINERS

    for kind, t in TRAINERS.items():
        step = r.step(t.step)
        if step.done and not step.manifest().get("skipped"):
            section = (step.manifest().get("config") or {}).get(kind) or {}
            trained[kind] = section.get("base_model")
    info["trained"] = trained
    if r.step("gate").done:
        g = r.step("gate").manifest()
        info["registry"] = {"version": g.get("version"), "promoted": g.get("promoted")}
    if r.step("evaluate").done:
        ev = r.step("evaluate").manifest()
        info["heldout_reward_accuracy"] = ev.get("reward_accuracy")
        info["heldout_reward_ci"] = ev.get("reward_ci")
    return info


def collect(cfg, rounds: list[int] | None) -> Collected:
    from preference.plumbing.store import Project
    from training.data import load_round_feedback, pairs_step, prompt_key

    project = Project(cfg.project)
    have = [n for n in project.rounds() if pairs_step(project.round(n)).done]
    wanted = have if rounds is None else [n for n in rounds if n in have]
    if rounds is not None and not wanted:
        raise CurateError(f"--rounds: none of {rounds} has labels in {project.root} (rounds with pairs: "
                          f"{', '.join(map(str, have)) or 'none'})")
    if not wanted:
        raise CurateError(f"{project.root} has no round with labels yet; run `curate round run` (or `curate "
                          "bootstrap`) first")
    out = Collected()
    seen: dict[tuple, int] = {}  # (prompt, chosen, rejected) → row index
    seen_unpaired: dict[tuple, int] = {}
    harm_vote = cfg.annotation.aggregation.harm_vote
    for n in wanted:
        r = project.round(n)
        out.rounds.append(_round_info(r, cfg))
        pairs = [PreferencePair.from_row(x) for x in read_rows(pairs_step(r).file("pairs.parquet"))]
        arms: dict[str, dict] = {}
        agreement: dict[str, float] = {}
        harms: dict[str, dict[str, list[str]]] = {}
        if n >= 1:
            if r.step("select").done:
                arms = {row["prompt_id"]: row for row in read_rows(r.step("select").file("selected.parquet"))}
            items = (read_json(r.step("pull").file("agreement.json")).get("items") or {})
            agreement = {k: v for k, v in items.items() if v is not None}
            harms = harm_votes(r.step("pull"), harm_vote)
            for comps in harms.values():
                for labels in comps.values():
                    out.harm["judged"]["answers"] += 1
                    out.harm["flagged"].update(labels)
                    out.harm["flagged"]["any"] += bool(labels)
        for p in pairs:
            sel = arms.get(p.prompt_id) or {}
            record_harm = harms.get(p.prompt_id, {})
            row = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "id": p.id,
                   "prompt_id": p.prompt_id, "round": int(n), "stage": p.stage, "source": p.source, "slice": p.slice,
                   "strategy": sel.get("strategy"), "arm": sel.get("arm"), "random_arm": sel.get("arm") == "random",
                   "annotator_count": len(p.annotators), "annotators": list(p.annotators),
                   "agreement": agreement.get(p.prompt_id), "chosen_harm": record_harm.get(p.chosen_id, []),
                   "rejected_harm": record_harm.get(p.rejected_id, []), "rejected_harmful": bool(p.rejected_harmful),
                   "margin": float(p.margin), "chosen_id": p.chosen_id, "rejected_id": p.rejected_id}
            key = (prompt_key(p.prompt), _answer(p.chosen).strip(), _answer(p.rejected).strip())
            reverse = (key[0], key[2], key[1])
            if reverse in seen:
                out.contradictions += 1
            if key in seen:  # the latest round's judgement of the same comparison wins
                out.duplicates += 1
                out.pairs[seen[key]] = row
            else:
                seen[key] = len(out.pairs)
                out.pairs.append(row)
        for f in load_round_feedback(r):
            row = {"prompt": f.prompt, "completion": f.completion, "label": bool(f.label), "id": f.id,
                   "prompt_id": f.prompt_id, "round": int(n), "source": f.source, "model_version": f.model_version,
                   "comment": f.comment}
            key = (prompt_key(f.prompt), _answer(f.completion).strip(), f.source)
            if key in seen_unpaired:
                out.duplicates += 1
                out.unpaired[seen_unpaired[key]] = row
            else:
                seen_unpaired[key] = len(out.unpaired)
                out.unpaired.append(row)
    return out


# ------------------------------------------------------------------------------------------------ datasets
def _messages():
    import datasets

    return [{"role": datasets.Value("string"), "content": datasets.Value("string")}]


def pair_features():
    import datasets

    s, i, b, f = (datasets.Value(t) for t in ("string", "int64", "bool", "float64"))
    return datasets.Features({
        "prompt": _messages(), "chosen": _messages(), "rejected": _messages(), "id": s, "prompt_id": s, "round": i,
        "stage": s, "source": s, "slice": s, "strategy": s, "arm": s, "random_arm": b, "annotator_count": i,
        "annotators": [s], "agreement": f, "chosen_harm": [s], "rejected_harm": [s], "rejected_harmful": b,
        "margin": f, "chosen_id": s, "rejected_id": s,
    })


def unpaired_features():
    import datasets

    s = datasets.Value("string")
    return datasets.Features({"prompt": _messages(), "completion": _messages(), "label": datasets.Value("bool"),
                              "id": s, "prompt_id": s, "round": datasets.Value("int64"), "source": s,
                              "model_version": s, "comment": s})


def _dataset_dict(rows: list[dict], features, test_share: float):
    """The rows split by prompt hash; an empty split is left out (a saved DatasetDict cannot hold one)."""
    import datasets

    parts = {name: [r for r in rows if split_of(r["prompt"], test_share) == name] for name in SPLITS}
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({c: [r[c] for r in part] for c in features}, features=features)
        for name, part in parts.items() if part
    })


def _write(dd, folder: Path, parquet_dir: Path) -> dict[str, int]:
    dd.save_to_disk(str(folder))
    parquet_dir.mkdir(parents=True, exist_ok=True)
    for name, ds in dd.items():
        ds.to_parquet(str(parquet_dir / f"{name}.parquet"))
    return {name: len(ds) for name, ds in dd.items()}


# ----------------------------------------------------------------------------------------------------- card
def _licenses(cfg, rounds: list[dict]) -> tuple[list[str], list[dict]]:
    """(the card's licence ids, the sources with their licences): pool sources and imported label sources."""
    sources = []
    for src in cfg.pool.sources:
        sources.append({"kind": "prompts (pool)", "name": Path(src.path).name, "path": str(src.path),
                        "license": getattr(src, "license", None)})
    for info in rounds:
        for src in info.get("sources") or []:
            sources.append({"kind": "imported labels", "name": src["name"], "path": src["path"],
                            "license": src.get("license"), "pairs": src.get("counts", {}).get("pairs", 0)})
    if cfg.export.license:
        return [cfg.export.license], sources
    ids = sorted({(s["license"] or "unknown").lower() for s in sources}) or ["unknown"]
    return ids, sources


def _fmt(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def limitations(cfg, got: Collected) -> list[str]:
    out = []
    loop = [r for r in got.rounds if r["kind"] == "loop"]
    if any((r.get("reviewers") or {}).get("simulated") for r in loop):
        out.append("Some or all loop rounds were answered by simulated reviewers (preference.simulated: answers "
                   "from a labelled reference set, a text classifier for harms), not by people; treat their labels "
                   "as a demonstration, not human judgements.")
    if loop:
        sizes = [r.get("reviewers", {}).get("records") or 0 for r in loop]
        out.append(f"The loop rounds are small ({', '.join(map(str, sizes))} records each): per-round agreement "
                   "figures are noisy.")
        gens = sorted({m for r in loop for m in (r.get("generation") or {}).get("models") or []})
        if gens:
            out.append(f"Candidate answers were written by {', '.join(gens)} (plus reference answers of the pool "
                       "source where the config includes them); their quality bounds the data's.")
        out.append("Prompts were chosen by active learning (a strategy arm beside a random arm): the strategy arm "
                   "over-represents prompts the reward model found uncertain; use `random_arm` to get an unbiased "
                   "sample.")
    if any(r["kind"] == "imported" for r in got.rounds):
        out.append("Round 0 holds imported seed labels (`stage: imported`): they come from the sources listed "
                   "above, were not reviewed in this project, and keep their own annotation guidelines and biases.")
    if got.contradictions:
        out.append(f"{got.contradictions} comparisons were judged both ways in different rounds; both are kept "
                   "(the latest round's rows last).")
    if any(p["annotator_count"] <= 1 for p in got.pairs if p["stage"] != "imported"):
        out.append("Some pairs rest on a single reviewer's answer (annotator_count ≤ 1).")
    return out + list(cfg.export.limitations)


def card_text(cfg, got: Collected, sizes: dict[str, dict[str, int]], licenses: list[str], sources: list[dict]) -> str:
    """The card's markdown body (after the YAML header)."""
    name = cfg.export.pretty_name or Path(cfg.project).name
    total_pairs = sum(sizes.get("pairs", {}).values())
    lines = [f"# {name}", "",
             f"Preference pairs curated with `curate` (active learning with humans in the loop) from the project "
             f"`{Path(cfg.project).name}`: {total_pairs} pairs"
             + (f" and {sum(sizes['unpaired'].values())} unpaired judgements" if sizes.get("unpaired") else "")
             + f" from rounds {', '.join(str(r['round']) for r in got.rounds)} "
             f"({got.duplicates} duplicates removed). {cfg.description}".rstrip(), "",
             "## Loading", "", "```python", "from datasets import load_dataset, load_from_disk",
             "pairs = load_dataset(\"<repo or folder>\")          # train/test, TRL conversational preference format",
             "pairs = load_from_disk(\"<export folder>\")         # the same, from `curate export`'s folder",
             "```", "",
             "Columns: `prompt`, `chosen`, `rejected` (TRL conversational format: lists of {role, content}) and "
             "provenance: `round` (0 = imported seed labels), `stage` (first = reviewers' consensus, review = decided "
             "by the second-stage review, imported), `source`, `slice`, `strategy` / `arm` / `random_arm` (which "
             "acquisition arm chose the prompt), `annotator_count`, `annotators`, `agreement` (Kendall τ between "
             "the record's reviewers), `chosen_harm` / `rejected_harm` (harm labels a majority of reviewers "
             "ticked), `rejected_harmful`, `margin` (strength of the preference; TRL's RewardTrainer uses a `margin` "
             "column in its loss when present), `id`, `prompt_id`, `chosen_id`, `rejected_id`. Splits: by a hash of "
             f"the prompt ({cfg.export.test_share:.0%} of prompts in test); every pair of a prompt is in one split.",
             "", "## Sources and licences", "", "| source | kind | licence | pairs |", "|---|---|---|---|"]
    for s in sources:
        lines.append(f"| `{s['name']}` ({s['path']}) | {s['kind']} | {s['license'] or 'unknown'} | "
                     f"{s.get('pairs', '–')} |")
    lines += ["", f"Dataset licence (metadata): {', '.join(licenses)}.", "", "## Models", ""]
    models = defaultdict(set)
    for r in got.rounds:
        for m in (r.get("generation") or {}).get("models") or []:
            models["generator (candidate answers)"].add(m)
        for m in (r.get("scoring") or {}).get("committee") or []:
            models["scoring committee"].add(m)
        if (r.get("scoring") or {}).get("embedding_model"):
            models["embeddings (selection)"].add(r["scoring"]["embedding_model"])
        for kind, base in (r.get("trained") or {}).items():
            models[f"{kind} (base model)"].add(str(base))
        if r.get("suggestions_by"):
            models["reviewers' suggestions (registry version)"].add(str(r["suggestions_by"]))
    lines += [f"- {role}: {', '.join(sorted(names))}" for role, names in models.items()] or ["- none recorded"]
    lines += ["", "## Rounds: selection, reviewers, agreement", "",
              "| round | pairs from | selection strategy | random share | reviewers | records | Kendall τ | "
              "Krippendorff α (harm) | held-out RM accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in got.rounds:
        acc = r.get("heldout_reward_accuracy")
        ci = r.get("heldout_reward_ci") or [None, None]
        acc_s = "–" if acc is None else f"{acc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "")
        if r["kind"] == "imported":
            src = ", ".join(s["name"] for s in r.get("sources") or [])
            lines.append(f"| 0 | imported: {src} | – | – | – | {r['counts'].get('records', '–')} | – | – | {acc_s} |")
            continue
        sel, rev = r.get("selection") or {}, r.get("reviewers") or {}
        who = f"{_fmt(rev.get('annotators'))}" + (" (simulated)" if rev.get("simulated") else "")
        strategy = str(sel.get("strategy")).replace("|", "\\|")  # a table cell: the pipe escaped
        lines.append(f"| {r['round']} | {rev.get('backend') or '–'} review | `{strategy}` "
                     f"({sel.get('reward_signals') or 'no reward signal'}) | {_fmt(sel.get('random_share'))} | {who} | "
                     f"{_fmt(rev.get('records'))} | {_fmt(rev.get('kendall_tau'))} | {_fmt(rev.get('harm_alpha'))} | "
                     f"{acc_s} |")
    judged = got.harm["judged"]["answers"]
    lines += ["", "## Harm flags", ""]
    if judged:
        lines += [f"Share of the {judged} answers reviewers judged that a majority flagged, per label "
                  f"(annotation.aggregation.harm_vote = {cfg.annotation.aggregation.harm_vote}):", "",
                  "| label | rate |", "|---|---|"]
        lines += [f"| {label} | {n / judged:.3f} |" for label, n in sorted(got.harm["flagged"].items())
                  if label != "any"]
        lines.append(f"| any | {got.harm['flagged']['any'] / judged:.3f} |")
    else:
        lines.append("No reviewer harm judgements in the exported rounds.")
    pairs = [p for p in got.pairs]
    if pairs:
        lines.append(f"\nPairs whose rejected answer is flagged harmful: {sum(p['rejected_harmful'] for p in pairs)} "
                     f"of {len(pairs)}.")
    lines += ["", "## Known limitations", ""] + [f"- {x}" for x in limitations(cfg, got)]
    lines += ["", "## Provenance", "",
              f"Exported {datetime.now(UTC).isoformat(timespec='seconds')} by `curate export` from `{cfg.project}`; "
              "every pair traces back to its round's step folder (`round-NNNN/pull/` or `round-0000/labels/`) by "
              "`id` and `prompt_id`."]
    return "\n".join(lines) + "\n"


def annotation_creators(rounds: list[dict]) -> list[str]:
    """The Hub's `annotations_creators`: simulated reviewers → machine-generated, people → expert-generated,
    imported labels → found."""
    out = set()
    for r in rounds:
        if r["kind"] == "imported":
            out.add("found")
        else:
            out.add("machine-generated" if (r.get("reviewers") or {}).get("simulated") else "expert-generated")
    return sorted(out)


def make_card(cfg, got: Collected, sizes: dict[str, dict[str, int]]):
    from huggingface_hub import DatasetCard, DatasetCardData

    licenses, sources = _licenses(cfg, got.rounds)
    configs = []
    for name, folder in (("default", "pairs"), ("unpaired", "unpaired")):
        if sizes.get(folder):
            configs.append({"config_name": name, **({"default": True} if name == "default" else {}),
                            "data_files": [{"split": s, "path": f"data/{folder}/{s}.parquet"} for s in SPLITS
                                           if sizes[folder].get(s)]})
    total = sum(sum(v.values()) for v in sizes.values())
    data = DatasetCardData(
        license=licenses[0] if len(licenses) == 1 else licenses,
        language=list(cfg.export.language) or None,
        task_categories=["text-generation", "text-classification"],
        task_ids=None,
        size_categories=[size_category(total)],
        pretty_name=cfg.export.pretty_name or Path(cfg.project).name,
        tags=list(cfg.export.tags),
        annotations_creators=annotation_creators(got.rounds),
        configs=configs,
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + card_text(cfg, got, sizes, licenses, sources))


# ----------------------------------------------------------------------------------------------------- export
def export_project(cfg, out: str | Path, *, rounds: list[int] | None = None, force: bool = False,
                   test_share: float | None = None) -> dict[str, Any]:
    """Write the export folder (see the module docstring); returns what export.json says."""
    out = Path(out)
    if out.exists() and not force:
        raise CurateError(f"export folder {out} already exists; choose another --out, or pass --force to replace it")
    if test_share is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, test_share=test_share))
    got = collect(cfg, rounds)
    with _quiet_datasets():
        info = _write_export(cfg, got, out)
    return info


@contextlib.contextmanager
def _quiet_datasets():
    """No `datasets` progress bars while the export writes (restored afterwards)."""
    from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    was = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was:
            enable_progress_bars()


def _write_export(cfg, got: Collected, out: Path) -> dict[str, Any]:
    if not got.pairs and not got.unpaired:
        raise CurateError(f"{cfg.project}: the selected rounds hold no pairs or judgements to export")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    sizes: dict[str, dict[str, int]] = {}
    if got.pairs:
        sizes["pairs"] = _write(_dataset_dict(got.pairs, pair_features(), cfg.export.test_share), staging,
                                staging / "data" / "pairs")
    if got.unpaired:
        sizes["unpaired"] = _write(_dataset_dict(got.unpaired, unpaired_features(), cfg.export.test_share),
                                   staging / "unpaired", staging / "data" / "unpaired")
    make_card(cfg, got, sizes).save(str(staging / "README.md"))
    info = {"project": str(cfg.project), "rounds": [r["round"] for r in got.rounds], "sizes": sizes,
            "duplicates_removed": got.duplicates, "contradictions": got.contradictions,
            "test_share": cfg.export.test_share, "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "summary": (f"{sum(sizes.get('pairs', {}).values())} pairs ("
                        + ", ".join(f"{sizes.get('pairs', {}).get(s, 0)} {s}" for s in SPLITS) + ")"
                        + (f", {sum(sizes['unpaired'].values())} unpaired" if "unpaired" in sizes else "")
                        + f" from rounds {', '.join(str(r['round']) for r in got.rounds)}")}
    write_json(staging / "export.json", info)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return info


def push(out: str | Path, repo: str, *, private: bool = False) -> str:
    """Upload the export folder's card and parquet files to the Hub dataset repo `repo`; returns its URL."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise CurateError("--push-to-hub: the Hub is offline (HF_HUB_OFFLINE=1, this tool's default); rerun with "
                          "HF_HUB_OFFLINE=0 in the environment")
    if not get_token():
        raise CurateError("--push-to-hub: no Hugging Face token; set HF_TOKEN or run `huggingface-cli login`")
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="dataset",
                      allow_patterns=["README.md", "data/**", "export.json"],
                      commit_message="curate export")
    return f"https://huggingface.co/datasets/{repo}"


__all__ = ["ExportConfig", "PAIR_COLUMNS", "UNPAIRED_COLUMNS", "collect", "export_project", "parse_rounds", "push",
           "split_of"]
