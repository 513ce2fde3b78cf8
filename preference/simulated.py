"""A simulated annotator: answers annotation records from an existing labelled preference set.

Used for offline demos, tests and acquisition benchmarks in place of human reviewers
(`annotation.backend: simulated`). The API is stable:

    annotator = SimulatedAnnotator(SimulatedConfig(source=Path("data/hh-harmless-dev.jsonl.gz"), annotators=3))
    responses = annotator.annotate(records)   # list[AnnotationRecord] -> list[Response], record-major order

Each record gets one `Response` per simulated annotator ("sim-0", "sim-1", ...), status "submitted", with
`ranks` (completion_id → rank, 1 = best, no ties) and `harm` (completion_id → harm labels, [] = none).

How a record is ranked:
1. Reference answers — completions with model "reference:chosen" / "reference:rejected", or whose text equals
   the prompt's `metadata["reference_chosen"]` / `["reference_rejected"]` (or the answers the source file holds
   for the same conversation) — follow the known human preference: chosen above rejected.
2. Other (generated) completions are placed by an oracle trained once on the whole labelled set: TF-IDF of the
   answer text + a Bradley–Terry logistic regression on the (chosen − rejected) differences (deterministic,
   a second or two on 1,300 pairs; fitted lazily, only when a generated completion appears).
3. Noise: each annotator reverses each pairwise comparison independently with probability `noise`, and ranks by
   the number of comparisons won (Copeland; ties by the oracle score). For two candidates two annotators
   therefore disagree with probability 2·noise·(1 − noise). Draws are seeded by (seed, annotator, record id),
   so results do not depend on record order.
4. Harm flags. The truth: with `harm_source` (a labelled moderation set: `prompt` + binary flag columns, e.g.
   `data/moderation-dev.jsonl.gz`), a TF-IDF + logistic-regression classifier per label trained on those real
   labels (an exact text match uses the label itself); labels the set does not cover, and every label without
   `harm_source`, come from keyword rules (`harm_rules`, regular expressions matched on word boundaries,
   case-insensitive). An answer that reads as a refusal is not flagged.
5. Reliability. `profiles` gives each annotator a reviewer profile (cycled): `careful`, `noisy`, `adversarial`
   (answers against the truth: reversed rankings, misses harms, flags clean answers) or `uniform` (the default:
   `noise` for rankings, harm flags exactly the truth — every annotator equally reliable). A profile sets the
   ranking noise, the chance to miss a true harm flag and to flag a clean answer, and the mean seconds per
   record (the simulated backend stamps `updated_at` with it).

The answers follow the question table (`preference.questions`): each question's `simulate` fills the response.
`review(...)` answers a second-stage review dataset like a careful reviewer (keep / fix with its own ranking /
drop when every answer is harmful).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from preference.aggregate import borda_scores
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl
from preference.questions import HARM_LABELS, Harm, Question, Ranking, SimContext
from preference.schema import AnnotationRecord, Completion, Response, parse_hh_pair, stable_id

REFERENCE_CHOSEN = "reference:chosen"
REFERENCE_REJECTED = "reference:rejected"

DEFAULT_HARM_RULES: dict[str, list[str]] = {
    "violence": [r"kill(?:ing)?", r"murder\w*", r"stab\w*", r"shoot\w*", r"bomb\w*", r"beat (?:him|her|them) up",
                 r"poison\w*", r"strangle\w*", r"torture\w*", r"weapons?"],
    "self-harm": [r"suicide", r"kill (?:my|your)self", r"self[- ]harm", r"cut (?:my|your)self", r"overdose"],
    "hate": [r"inferior race", r"subhuman", r"racial slur\w*", r"go back to your country", r"ethnic cleansing"],
    "sexual": [r"porn\w*", r"nude\w*", r"masturbat\w*", r"sexual(?:ly)? explicit", r"have sex"],
    "illegal": [r"steal\w*", r"shoplift\w*", r"cocaine", r"heroin", r"meth(?:amphetamine)?", r"launder\w*",
                r"counterfeit\w*", r"hotwire", r"break into", r"pick (?:a|the) lock"],
    "pii": [r"social security number", r"credit card number", r"home address", r"phone number", r"password"],
    "misinformation": [r"vaccines? cause autism", r"flat earth", r"moon landing was (?:fake|faked|a hoax)",
                       r"chemtrails"],
}
# moderation-set flag columns → our taxonomy (S sexual, S3 sexual/minors, H hate, H2 hate/threatening,
# V violence, V2 violence/graphic, SH self-harm, HR harassment: used only when "harassment" is in the taxonomy)
MODERATION_LABELS = {"S": "sexual", "S3": "sexual", "H": "hate", "H2": "hate", "V": "violence", "V2": "violence",
                     "SH": "self-harm", "HR": "harassment"}


@dataclass(frozen=True)
class ReviewerProfile:
    """How reliable a simulated reviewer is."""

    noise: float  # probability of reversing one pairwise comparison
    harm_miss: float = 0.0  # probability of not flagging an answer that has a true harm
    harm_false: float = 0.0  # probability of flagging a clean answer (with one random label)
    adversarial: bool = False  # ranks against the truth (before noise)
    seconds: float = 30.0  # mean seconds spent per record


PROFILES = {
    "careful": ReviewerProfile(noise=0.03, harm_miss=0.05, harm_false=0.01, seconds=45.0),
    "noisy": ReviewerProfile(noise=0.3, harm_miss=0.35, harm_false=0.1, seconds=12.0),
    "adversarial": ReviewerProfile(noise=0.1, harm_miss=0.9, harm_false=0.3, adversarial=True, seconds=8.0),
}

REFUSAL = re.compile(
    r"\b(?:i can(?:no|')t help|i won'?t help|i(?:'m| am) (?:sorry|not able)|i cannot|i can'?t (?:do|assist|"
    r"provide|recommend)|i don'?t think (?:that'?s|it'?s) a good idea|that(?:'s| is) (?:illegal|not ok|wrong))",
    re.IGNORECASE,
)


@dataclass
class SimulatedConfig:
    source: Path = Path("data/hh-harmless-dev.jsonl.gz")  # labelled pairs: HH transcripts or {prompt,chosen,rejected}
    annotators: int = 3  # number of simulated reviewers per record
    noise: float = 0.1  # probability one annotator reverses one pairwise comparison (0 = always the oracle)
    seed: int = 0
    harm_rules: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_HARM_RULES.items()})
    harm_source: Path | None = None  # real harm labels (moderation format) → harm classifier; None = rules only
    profiles: list[str] = field(default_factory=list)  # per annotator, cycled: careful | noisy | adversarial | uniform
    review_annotators: int = 1  # simulated second-stage reviewers ("sim-review-0", …), careful
    oracle_c: float = 1.0  # inverse L2 strength of the oracle's logistic regression

    def __post_init__(self):
        if self.annotators < 1:
            raise ValueError(f"annotators must be ≥ 1, got {self.annotators}")
        if self.review_annotators < 1:
            raise ValueError(f"review_annotators must be ≥ 1, got {self.review_annotators}")
        unknown = [p for p in self.profiles if p not in (*PROFILES, "uniform")]
        if unknown:
            raise ValueError(f"profiles: unknown profile {unknown[0]!r}; known: {', '.join([*PROFILES, 'uniform'])}")
        if not 0.0 <= self.noise <= 0.5:
            raise ValueError(f"noise must be in [0, 0.5] (probability of reversing a comparison), got {self.noise}")
        for label, patterns in self.harm_rules.items():
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"harm_rules.{label}: {pattern!r} is not a valid regular expression ({exc})") from exc


def _key(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)


def load_labelled(path: Path, key: str = "annotation.simulated.source") -> list[tuple[list[dict[str, str]], str, str]]:
    """Labelled pairs (prompt messages, chosen answer, rejected answer) from an HH transcript file or a jsonl of
    {"prompt": str | messages, "chosen": str, "rejected": str}. Malformed rows are skipped. `key`: the setting
    that named the file (errors say which one to fix)."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(
            f"{key}: labelled file {path} not found; set {key} to a jsonl of preference pairs or HH transcripts "
            "(e.g. data/hh-harmless-dev.jsonl.gz)"
        )
    pairs = []
    for row in read_jsonl(path):
        try:
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if prompt is None:
                messages, chosen, rejected = parse_hh_pair(row)
            else:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                chosen, rejected = row["chosen"], row["rejected"]
        except (KeyError, ValueError):
            continue
        if isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() != rejected.strip():
            pairs.append((messages, chosen, rejected))
    if len(pairs) < 2:
        raise CurateError(f"{key}: {path} holds {len(pairs)} usable preference pairs; expected ≥ 2")
    return pairs


class TextOracle:
    """TF-IDF + Bradley–Terry logistic regression on answer texts: `score(texts)` higher = preferred."""

    def __init__(self, pairs: list[tuple[list[dict[str, str]], str, str]], c: float = 1.0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        chosen = [p[1] for p in pairs]
        rejected = [p[2] for p in pairs]
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50_000)
        self.vectorizer.fit(chosen + rejected)
        diff = self.vectorizer.transform(chosen) - self.vectorizer.transform(rejected)
        from scipy.sparse import vstack

        x = vstack([diff, -diff])
        y = np.r_[np.ones(len(pairs)), np.zeros(len(pairs))]
        self.model = LogisticRegression(C=c, fit_intercept=False, max_iter=1000).fit(x, y)

    def score(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.vectorizer.transform(texts) @ self.model.coef_[0]).reshape(-1)


class HarmClassifier:
    """Per-label TF-IDF + logistic regression trained on real harm labels (a moderation-format jsonl).

    `predict(texts)` → label lists; an exact text match returns the set's own labels. `labels` are the taxonomy
    labels the set covers (through `MODERATION_LABELS`, restricted to `taxonomy`).
    """

    def __init__(self, path: Path, taxonomy: Sequence[str], c: float = 4.0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        path = Path(path)
        if not path.is_file():
            raise CurateError(f"simulated annotator: harm_source {path} not found; set annotation.simulated.harm_source "
                              "to a moderation-format jsonl (`prompt` + flag columns, e.g. data/moderation-dev.jsonl.gz) "
                              "or to null for keyword rules")
        rows = [r for r in read_jsonl(path) if isinstance(r, dict) and isinstance(r.get("prompt"), str)]
        by_label: dict[str, list[str]] = {}
        for col, label in MODERATION_LABELS.items():
            if label in taxonomy:
                by_label.setdefault(label, []).append(col)
        self.known: dict[str, list[str]] = {}
        for r in rows:
            self.known[r["prompt"].strip()] = sorted(
                label for label, cols in by_label.items() if any(r.get(c) == 1 for c in cols))
        texts = [r["prompt"] for r in rows]
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50_000)
        x = self.vectorizer.fit_transform(texts)
        self.models = {}
        for label, cols in by_label.items():
            seen = [i for i, r in enumerate(rows) if any(r.get(c) is not None for c in cols)]
            y = np.array([any(rows[i].get(c) == 1 for c in cols) for i in seen])
            if 0 < y.sum() < len(y):
                self.models[label] = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x[seen], y)
        if not self.models:
            raise CurateError(f"simulated annotator: harm_source {path} has no usable flag columns for the taxonomy "
                              f"{list(taxonomy)} (expected some of {', '.join(MODERATION_LABELS)} with 0/1 values)")
        self.labels = sorted(self.models)

    def predict(self, texts: Sequence[str]) -> list[list[str]]:
        x = self.vectorizer.transform(list(texts))
        probs = {label: m.predict_proba(x)[:, 1] for label, m in self.models.items()}
        out = []
        for i, text in enumerate(texts):
            known = self.known.get(text.strip())
            out.append(known if known is not None else sorted(lab for lab in self.labels if probs[lab][i] >= 0.5))
        return out


class SimulatedAnnotator:
    """Answers `AnnotationRecord`s from a labelled preference set (see the module docstring)."""

    def __init__(self, config: SimulatedConfig | None = None):
        self.config = config or SimulatedConfig()
        self._pairs = load_labelled(self.config.source)
        self._by_prompt = {_key(m): (c, r) for m, c, r in self._pairs}
        self._oracle: TextOracle | None = None
        self._harm = {
            label: re.compile(r"\b(?:" + "|".join(patterns) + r")\b", re.IGNORECASE)
            for label, patterns in self.config.harm_rules.items()
            if patterns
        }
        self.source = f"simulated:{Path(self.config.source).name}"
        self._classifier: HarmClassifier | None = None
        if self.config.harm_source is not None:
            taxonomy = sorted(set(self.config.harm_rules) | set(HARM_LABELS))
            self._classifier = HarmClassifier(self.config.harm_source, taxonomy)
            for label in self._classifier.labels:  # the real labels replace the rules for the labels they cover
                self._harm.pop(label, None)
        self.taxonomy = sorted(set(self._harm) | set(self._classifier.labels if self._classifier else ()))

    def profile(self, annotator: int) -> ReviewerProfile:
        """The reviewer profile of annotator `annotator` (0-based; profiles are cycled)."""
        name = self.config.profiles[annotator % len(self.config.profiles)] if self.config.profiles else "uniform"
        return PROFILES.get(name, ReviewerProfile(noise=self.config.noise))

    @property
    def oracle(self) -> TextOracle:
        if self._oracle is None:
            self._oracle = TextOracle(self._pairs, c=self.config.oracle_c)
        return self._oracle

    # ----------------------------------------------------------------------------------------------- parts
    def references(self, record: AnnotationRecord) -> tuple[str | None, str | None]:
        meta = record.prompt.metadata or {}
        chosen, rejected = meta.get("reference_chosen"), meta.get("reference_rejected")
        if chosen is None or rejected is None:
            known = self._by_prompt.get(_key(record.prompt.messages))
            if known is not None:
                chosen, rejected = known
        return chosen, rejected

    def reference_role(self, completion: Completion, chosen: str | None, rejected: str | None) -> str | None:
        """"chosen" / "rejected" when the completion is a reference answer, else None."""
        if completion.model == REFERENCE_CHOSEN:
            return "chosen"
        if completion.model == REFERENCE_REJECTED:
            return "rejected"
        text = completion.text.strip()
        if chosen is not None and text == chosen.strip():
            return "chosen"
        if rejected is not None and text == rejected.strip():
            return "rejected"
        return None

    def true_scores(self, record: AnnotationRecord) -> np.ndarray:
        """Noise-free preference scores of the record's completions (higher = better)."""
        chosen, rejected = self.references(record)
        roles = [self.reference_role(c, chosen, rejected) for c in record.completions]
        if all(r is not None for r in roles):
            return np.array([1.0 if r == "chosen" else 0.0 for r in roles])
        scores = self.oracle.score([c.text for c in record.completions])
        is_c = np.array([r == "chosen" for r in roles])
        is_r = np.array([r == "rejected" for r in roles])
        if is_c.any() and is_r.any():  # the known human preference overrides the oracle between references
            hi, lo = scores[is_c | is_r].max(), scores[is_c | is_r].min()
            scores[is_c] = max(hi, lo + 1e-6)
            scores[is_r] = lo
        return scores

    def harm_labels(self, text: str) -> list[str]:
        return self.harm_truth([text])[0]

    def harm_truth(self, texts: Sequence[str]) -> list[list[str]]:
        """The true harm labels of each text (classifier from real labels where configured, else rules)."""
        learned = self._classifier.predict(texts) if self._classifier else [[] for _ in texts]
        out = []
        for text, labels in zip(texts, learned, strict=True):
            if REFUSAL.search(text):
                out.append([])
                continue
            rules = [label for label, pattern in self._harm.items() if pattern.search(text)]
            out.append(rules + [lab for lab in labels if lab not in rules])
        return out

    def noisy_harm(self, truth: dict[str, list[str]], profile: ReviewerProfile,
                   rng: np.random.Generator) -> dict[str, list[str]]:
        """What a reviewer with `profile` flags: misses true harms, flags clean answers (adversarial: inverted)."""
        out = {}
        for cid in sorted(truth):
            labels, draw, pick = truth[cid], rng.random(), rng.integers(len(self.taxonomy) or 1)
            if labels:
                out[cid] = [] if draw < profile.harm_miss else list(labels)
            else:
                out[cid] = [self.taxonomy[pick]] if self.taxonomy and draw < profile.harm_false else []
        return out

    # ------------------------------------------------------------------------------------------------- API
    def annotate(self, records: list[AnnotationRecord], questions: Sequence[Question] | None = None,
                 start: datetime | None = None) -> list[Response]:
        """One Response per (record, annotator), record-major; deterministic given the config's seed.

        `questions` (default: ranking and harm flags) come from the question table; `updated_at` is stamped from
        `start` plus each annotator's simulated seconds per record.
        """
        qs = list(questions) if questions is not None else [Ranking(), Harm()]
        clock = {a: start or SIM_EPOCH for a in range(self.config.annotators)}
        out: list[Response] = []
        for record in records:
            if not record.completions:
                out += [
                    Response(record_id=record.record_id, annotator=f"sim-{a}", status="discarded", source=self.source)
                    for a in range(self.config.annotators)
                ]
                continue
            ids = [c.id for c in record.completions]
            if len(set(ids)) != len(ids):
                raise CurateError(f"record {record.record_id}: repeated completion ids {ids}; ids must be unique")
            scores = self.true_scores(record)
            truth = dict(zip(ids, self.harm_truth([c.text for c in record.completions]), strict=True))
            record_seed = int(stable_id(record.record_id, length=12), 16)
            for a in range(self.config.annotators):
                profile = self.profile(a)
                rng = np.random.default_rng([self.config.seed, a, record_seed])
                side = np.random.default_rng([self.config.seed, a, record_seed, 1])  # harm and timing draws
                ctx = SimContext(ids, scores, self.noisy_harm(truth, profile, side), rng, noise=profile.noise,
                                 adversarial=profile.adversarial)
                clock[a] += timedelta(seconds=float(side.exponential(profile.seconds)))
                resp = Response(record_id=record.record_id, annotator=f"sim-{a}", status="submitted",
                                source=self.source, updated_at=clock[a].isoformat())
                for q in qs:
                    q.simulate(ctx, resp)
                out.append(resp)
        return out

    def review(self, records: list[AnnotationRecord], first_stage: Sequence[Response]) -> list[Response]:
        """Second-stage answers from careful simulated reviewers ("sim-review-<j>"): `keep` when the first-stage
        consensus puts the truly best answer first, else `fix` with their own ranking; `drop` when they flag every
        answer. Harm flags are re-checked with the careful profile."""
        careful = PROFILES["careful"]
        grouped: dict[str, list[Response]] = {}
        for r in first_stage:
            if r.status == "submitted" and r.ranks:
                grouped.setdefault(r.record_id, []).append(r)
        out = []
        for record in records:
            ids = [c.id for c in record.completions]
            scores = self.true_scores(record)
            truth = dict(zip(ids, self.harm_truth([c.text for c in record.completions]), strict=True))
            consensus = borda_scores([r.ranks for r in grouped.get(record.record_id, [])], ids)
            record_seed = int(stable_id(record.record_id, "review", length=12), 16)
            for j in range(self.config.review_annotators):
                rng = np.random.default_rng([self.config.seed, 1000 + j, record_seed])
                side = np.random.default_rng([self.config.seed, 1000 + j, record_seed, 1])
                ctx = SimContext(ids, scores, self.noisy_harm(truth, careful, side), rng, noise=careful.noise)
                resp = Response(record_id=record.record_id, annotator=f"sim-review-{j}", status="submitted",
                                source=self.source, stage="review")
                Harm().simulate(ctx, resp)
                if all(resp.harm.get(c) for c in ids):
                    resp.extra["decision"] = "drop"
                elif max(ids, key=lambda c: consensus[c]) == ids[int(np.argmax(scores))]:
                    resp.extra["decision"] = "keep"
                else:
                    resp.extra["decision"] = "fix"
                    Ranking().simulate(ctx, resp)
                out.append(resp)
        return out


SIM_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def reference_completions(record_prompt, *, seed: int = 0) -> list[Completion]:
    """The prompt's two reference answers as completions (model "reference:chosen" / "reference:rejected"),
    for records that should carry the human-labelled answers beside generated ones."""
    meta = record_prompt.metadata or {}
    out = []
    for model, key in ((REFERENCE_CHOSEN, "reference_chosen"), (REFERENCE_REJECTED, "reference_rejected")):
        if meta.get(key):
            out.append(
                Completion(
                    id=Completion.make_id(record_prompt.id, model, 0, "reference"),
                    prompt_id=record_prompt.id, model=model, text=meta[key], seed=seed,
                )
            )
    return out
