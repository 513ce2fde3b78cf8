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
Harm flags come from keyword rules per taxonomy label (`harm_rules`, regular expressions matched on word
boundaries, case-insensitive); an answer that reads as a refusal is not flagged. Harm flags are the same for all
annotators.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl
from preference.schema import AnnotationRecord, Completion, Response, parse_hh_pair, stable_id

REFERENCE_CHOSEN = "reference:chosen"
REFERENCE_REJECTED = "reference:rejected"
HARM_LABELS = ("violence", "self-harm", "hate", "sexual", "illegal", "pii", "misinformation")

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
    oracle_c: float = 1.0  # inverse L2 strength of the oracle's logistic regression

    def __post_init__(self):
        if self.annotators < 1:
            raise ValueError(f"annotators must be ≥ 1, got {self.annotators}")
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


def load_labelled(path: Path) -> list[tuple[list[dict[str, str]], str, str]]:
    """Labelled pairs (prompt messages, chosen answer, rejected answer) from an HH transcript file or a jsonl of
    {"prompt": str | messages, "chosen": str, "rejected": str}. Malformed rows are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(
            f"simulated annotator: labelled file {path} not found; set annotation's simulated `source` to a jsonl "
            "of preference pairs (e.g. data/hh-harmless-dev.jsonl.gz)"
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
        raise CurateError(f"simulated annotator: {path} holds {len(pairs)} usable preference pairs; expected ≥ 2")
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
        if REFUSAL.search(text):
            return []
        return [label for label, pattern in self._harm.items() if pattern.search(text)]

    def noisy_ranks(self, scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """1-based ranks after reversing each pairwise comparison with probability `noise` (Copeland count)."""
        n = len(scores)
        better = scores[:, None] > scores[None, :]
        flips = np.triu(rng.random((n, n)) < self.config.noise, k=1)
        flips = flips | flips.T
        wins = (better ^ (flips & (better | better.T))).sum(axis=1)
        order = np.lexsort((-scores, -wins))
        ranks = np.empty(n, dtype=np.int64)
        ranks[order] = np.arange(1, n + 1)
        return ranks

    # ------------------------------------------------------------------------------------------------- API
    def annotate(self, records: list[AnnotationRecord]) -> list[Response]:
        """One Response per (record, annotator), record-major; deterministic given the config's seed."""
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
            harm = {c.id: self.harm_labels(c.text) for c in record.completions}
            record_seed = int(stable_id(record.record_id, length=12), 16)
            for a in range(self.config.annotators):
                rng = np.random.default_rng([self.config.seed, a, record_seed])
                ranks = self.noisy_ranks(scores, rng)
                out.append(
                    Response(
                        record_id=record.record_id,
                        annotator=f"sim-{a}",
                        status="submitted",
                        ranks={cid: int(r) for cid, r in zip(ids, ranks, strict=True)},
                        harm={cid: list(labels) for cid, labels in harm.items()},
                        source=self.source,
                    )
                )
        return out


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
