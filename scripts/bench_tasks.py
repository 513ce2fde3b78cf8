"""Data, features and learners of the acquisition benchmark (`scripts/bench_acquisition.py` is the entry point).

Three shapes of data (`--format`), each read into one `Task`:
- `hh`: Anthropic HH transcripts `{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": …}`; an item is a
  prompt with its two answers and one comparison (a fixed pair);
- `qa-feedback`: FineGrainedRLHF qa-feedback rows `{"question", "prediction 1".."prediction 4", "preference":
  [6 judgements in the order 1v2, 1v3, 1v4, 2v3, 2v4, 3v4: 1 = first better, 2 = second, 0 = no preference]}`;
  an item is a question with 4 answers and 6 possible comparisons (the multi-completion setting);
- `moderation`: `{"prompt", <flag>: 0/1/null, ...}` (OpenAI moderation samples: S, H, V, HR, SH, S3, H2, V2); an
  item is a prompt with a binary label (harmful = any flag set) and a slice (its rarest flag, or "benign").

Learners (the "current model" acquisition signals come from):
- preference tasks: `curation.ensemble.BTEnsemble` (bootstrap Bradley–Terry logistic models on answer-feature
  differences); the quality is held-out pairwise accuracy on the test prompts' non-tie human judgements;
- moderation: a bootstrap ensemble of class-balanced logistic regressions (a harm classifier); the quality is the
  rare-slice balanced accuracy ½ (accuracy on benign prompts + mean over harm slices of their recall).
Both give per item `reward_margin` (small = the model cannot tell: the smallest |mean reward gap| of an item's
open comparisons, or |mean logit| of the classifier) and `reward_disagreement` (std across members of that gap /
logit, largest over open comparisons), plus member rewards per answer for the completion choosers.

Features (`--features`): `tfidf` (TF-IDF 1–2-grams of prompt + answer, TruncatedSVD to 256-d; seconds) or
`smollm2` (SmolLM2-135M-Instruct last hidden state mean-pooled over the answer tokens — over the prompt for
moderation — plus the answer's mean token logprob and entropy; fp32/bf16 as `preference.plumbing.hardware`
decides; computed once, niced, cached under `~/.cache/curate/bench-features/`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curation.ensemble import BTEnsemble, EnsembleConfig, Pairs
from preference.plumbing.errors import CurateError
from preference.plumbing.io import open_text
from preference.schema import parse_hh_pair, prompt_text

QA_ORDER = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # qa-feedback's 6 judgements
MODERATION_FLAGS = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")


@dataclass
class Task:
    """Items (prompts) with answers and human comparisons (preference), or with a binary label (classification).

    `answers[i]` are global answer indices of item i; `comparisons[i]` lists (a, b, outcome) over those global
    indices, outcome 1 = a better, 2 = b better, 0 = no preference (a tie: a spent label that teaches nothing)."""

    name: str
    kind: str  # "preference" | "classification"
    prompts: list[str]
    slices: np.ndarray
    answer_texts: list[str] = field(default_factory=list)
    answer_prompt: list[int] = field(default_factory=list)  # item of each answer
    answers: list[list[int]] = field(default_factory=list)
    comparisons: list[list[tuple[int, int, int]]] = field(default_factory=list)
    labels: np.ndarray | None = None  # classification: harmful?

    def __len__(self) -> int:
        return len(self.prompts)

    def units(self, items) -> int:
        """Label units (comparisons, or prompts) the items hold."""
        if self.kind == "classification":
            return len(items)
        return sum(len(self.comparisons[i]) for i in items)


def _read(path: Path, fmt: str) -> list[dict]:
    rows = []
    try:
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CurateError(f"{path}:{lineno}: not valid JSON ({exc.msg}); --format {fmt} reads jsonl") from exc
                if not isinstance(row, dict):
                    raise CurateError(f"{path}:{lineno}: expected a JSON object per line for --format {fmt}")
                rows.append((lineno, row))
    except OSError as exc:
        raise CurateError(f"--data {path}: cannot read ({exc.strerror})") from exc
    except (EOFError, UnicodeDecodeError) as exc:
        raise CurateError(f"--data {path}: not a (gzipped) UTF-8 jsonl file ({exc})") from exc
    if not rows:
        raise CurateError(f"--data {path}: no rows")
    return rows


def load_hh(path: Path) -> Task:
    prompts, texts, owner, answers, comps = [], [], [], [], []
    rows = _read(path, "hh")
    for lineno, row in rows:
        if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise CurateError(f"{path}:{lineno}: --format hh expects string 'chosen' and 'rejected' HH transcripts "
                              f"(keys: {', '.join(sorted(row)) or 'none'}); use --format qa-feedback or moderation")
        try:
            messages, chosen, rejected = parse_hh_pair(row)
        except ValueError:  # not a comparison of two answers to one prompt: not a usable pair
            continue
        i = len(prompts)
        prompts.append(prompt_text(messages))
        answers.append([len(texts), len(texts) + 1])
        texts += [chosen, rejected]
        owner += [i, i]
        comps.append([(answers[-1][0], answers[-1][1], 1)])
    return Task(Path(path).name, "preference", prompts, np.full(len(prompts), "default", dtype=object), texts, owner,
                answers, comps)


def load_qa_feedback(path: Path) -> Task:
    prompts, texts, owner, answers, comps = [], [], [], [], []
    for lineno, row in _read(path, "qa-feedback"):
        preds = [row.get(f"prediction {k}") for k in range(1, 5)]
        pref = row.get("preference")
        if not isinstance(row.get("question"), str) or not all(isinstance(p, str) for p in preds):
            raise CurateError(f"{path}:{lineno}: --format qa-feedback expects 'question' and 'prediction 1'..'prediction 4' "
                              f"strings (keys: {', '.join(sorted(row)) or 'none'})")
        if not isinstance(pref, list) or len(pref) != 6 or any(p not in (0, 1, 2) for p in pref):
            raise CurateError(f"{path}:{lineno}: --format qa-feedback expects 'preference': 6 judgements of 0/1/2 "
                              f"(1v2, 1v3, 1v4, 2v3, 2v4, 3v4), got {pref!r}")
        i = len(prompts)
        prompts.append(row["question"])
        ids = list(range(len(texts), len(texts) + 4))
        texts += preds
        owner += [i] * 4
        answers.append(ids)
        comps.append([(ids[a], ids[b], int(o)) for (a, b), o in zip(QA_ORDER, pref, strict=True)])
    return Task(Path(path).name, "preference", prompts, np.full(len(prompts), "default", dtype=object), texts, owner,
                answers, comps)


def load_moderation(path: Path) -> Task:
    rows = _read(path, "moderation")
    flags = sorted({k for _, r in rows for k, v in r.items() if k != "prompt" and v in (0, 1)})
    if not flags:
        raise CurateError(f"{path}: --format moderation expects 'prompt' plus 0/1 harm flags per row "
                          f"(e.g. {', '.join(MODERATION_FLAGS)}); found no flag columns")
    counts = {f: sum(1 for _, r in rows if r.get(f) == 1) for f in flags}
    prompts, slices, labels = [], [], []
    for lineno, row in rows:
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise CurateError(f"{path}:{lineno}: --format moderation expects a non-empty 'prompt' string")
        bad = [k for k in flags if row.get(k) not in (0, 1, None)]
        if bad:
            raise CurateError(f"{path}:{lineno}: harm flag {bad[0]!r} must be 0, 1 or null, got {row[bad[0]]!r}")
        on = [f for f in flags if row.get(f) == 1]
        prompts.append(row["prompt"])
        labels.append(bool(on))
        slices.append(min(on, key=lambda f: (counts[f], f)) if on else "benign")  # the rarest flag it carries
    return Task(Path(path).name, "classification", prompts, np.asarray(slices, dtype=object),
                labels=np.asarray(labels, dtype=bool))


LOADERS = {"hh": load_hh, "qa-feedback": load_qa_feedback, "moderation": load_moderation}


# ------------------------------------------------------------------------------------------------- features
def texts_for_features(task: Task) -> tuple[list[str], list[str]]:
    """(context, target) per feature row: answers with their prompt (preference) or prompts (classification)."""
    if task.kind == "classification":
        return [""] * len(task), list(task.prompts)
    return [task.prompts[p] for p in task.answer_prompt], list(task.answer_texts)


def tfidf_features(task: Task, dim: int = 256) -> dict[str, np.ndarray]:
    """TF-IDF (1–2-grams, 20k terms) of prompt + answer reduced by TruncatedSVD; cached like the SmolLM2 ones."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    context, target = texts_for_features(task)
    path = _cache_path("tfidf", task, [context, target, dim])
    if path.is_file():
        return _load(path)
    texts = [f"{c}\n\n{t}" if c else t for c, t in zip(context, target, strict=True)]
    x = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=20000, sublinear_tf=True).fit_transform(texts)
    z = TruncatedSVD(n_components=min(dim, x.shape[1] - 1), random_state=0).fit_transform(x).astype(np.float32)
    return _save(path, {"emb": z})


def _cache_path(kind: str, task: Task, content) -> Path:
    key = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
    return feature_cache() / f"{kind}-{task.kind}-{key}.npz"


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)
    return arrays


def feature_cache() -> Path:
    return Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate") / "bench-features"


def smollm2_features(task: Task, *, max_tokens: int = 256, batch_size: int = 8,
                     progress: bool = True) -> dict[str, np.ndarray]:
    """Mean-pooled last hidden states of SmolLM2 over the target tokens (an answer after its ChatML prompt, or a
    prompt as the user turn), the target's mean token logprob and mean entropy. Cached as .npz (no pickle) by the
    hash of the texts; the process lowers its CPU priority (os.nice) while computing: the machine is shared."""
    context, target = texts_for_features(task)
    path = _cache_path("smollm2", task, [context, target, max_tokens])
    if path.is_file():
        return _load(path)
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preference.plumbing.hardware import resolve_dtype, resolve_threads
    from training.models import SMOLLM2, resolve_model

    os.nice(10)
    torch.set_num_threads(resolve_threads(None))
    model_dir = resolve_model(SMOLLM2, fetch=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dtype = getattr(torch, resolve_dtype("auto"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    seqs = []
    for c, t in zip(context, target, strict=True):
        if c:  # an answer after its prompt, as the chat model would have produced it
            head = tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        else:  # a prompt, as a user turn
            head = "<|im_start|>user\n"
        body = t + "<|im_end|>"
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        body_ids = tok(body, add_special_tokens=False)["input_ids"][: max_tokens * 3 // 4]
        keep = max(1, max_tokens - len(body_ids))
        ids = head_ids[-keep:] + body_ids
        seqs.append((ids, len(ids) - len(body_ids)))
    order = np.argsort([len(s[0]) for s in seqs])
    n, dim = len(seqs), model.config.hidden_size
    out = {"emb": np.zeros((n, dim), np.float32), "logprob": np.zeros(n, np.float32),
           "entropy": np.zeros(n, np.float32)}
    with torch.inference_mode():
        for b in tqdm(range(0, n, batch_size), disable=not progress, desc=f"SmolLM2 features ({task.name})"):
            rows = order[b : b + batch_size]
            width = max(len(seqs[r][0]) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id or 0)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(seqs[r][0])] = torch.tensor(seqs[r][0])
                mask[j, : len(seqs[r][0])] = 1
            res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = res.hidden_states[-1].float()
            logp = torch.log_softmax(res.logits.float(), dim=-1)
            for j, r in enumerate(rows):
                seq, start = seqs[r]
                end = len(seq)
                out["emb"][r] = hidden[j, start:end].mean(0).numpy()
                lp = logp[j, start - 1 : end - 1]
                out["logprob"][r] = lp.gather(1, torch.tensor(seq[start:end])[:, None]).mean().item()
                out["entropy"][r] = -(lp.exp() * lp).sum(-1).mean().item()
    return _save(path, out)


# ------------------------------------------------------------------------------------------------- learners
class PreferenceLearner:
    """BT ensemble on answer features; accuracy on held-out non-tie judgements."""

    def __init__(self, task: Task, feats: dict[str, np.ndarray], members: int, c: float, seed: int):
        self.task, self.emb = task, feats["emb"]
        self.config = EnsembleConfig(members=members, c=c, seed=seed)
        self.model: BTEnsemble | None = None

    def fit(self, labelled: list[tuple[int, int, int]]) -> None:
        pairs = [(a, b) if o == 1 else (b, a) for a, b, o in labelled if o != 0]
        self.model = None
        if len(pairs) >= 2:
            idx = np.array(pairs)
            self.model = BTEnsemble(self.config).fit(Pairs(self.emb[idx[:, 0]], self.emb[idx[:, 1]]))

    def rewards(self, answers: np.ndarray) -> np.ndarray:
        """(K, len(answers)) member rewards (zeros before the model exists)."""
        if self.model is None:
            return np.zeros((self.config.members, len(answers)))
        return self.model.reward(self.emb[answers])

    def quality(self, test_comparisons: list[tuple[int, int, int]]) -> float:
        comps = [(a, b) if o == 1 else (b, a) for a, b, o in test_comparisons if o != 0]
        if self.model is None:
            return 0.5
        idx = np.array(comps)
        margin = self.model.compare(self.emb[idx[:, 0]], self.emb[idx[:, 1]]).margin
        return float(np.mean((margin > 0) + 0.5 * (margin == 0)))


class HarmClassifier:
    """Bootstrap ensemble of class-balanced logistic regressions on prompt features; rare-slice balanced
    accuracy on the test prompts."""

    def __init__(self, task: Task, feats: dict[str, np.ndarray], members: int, c: float, seed: int):
        self.task, self.emb = task, feats["emb"]
        self.members, self.c, self.seed = members, c, seed
        self.mean = self.emb.mean(axis=0)
        self.scale = self.emb.std(axis=0) + 1e-6
        self.coef: np.ndarray | None = None  # (K, D + 1)

    def fit(self, items: list[int]) -> None:
        from sklearn.linear_model import LogisticRegression

        y = self.task.labels[items]
        self.coef = None
        if len(set(y.tolist())) < 2:
            return
        x = (self.emb[items] - self.mean) / self.scale
        rng = np.random.default_rng(self.seed)
        coefs = []
        for _ in range(self.members):
            rows = rng.integers(0, len(items), len(items))
            if len(set(y[rows].tolist())) < 2:
                rows = np.arange(len(items))
            lr = LogisticRegression(C=self.c, class_weight="balanced", max_iter=500).fit(x[rows], y[rows])
            coefs.append(np.r_[lr.coef_[0], lr.intercept_])
        self.coef = np.array(coefs)

    def logits(self, items: np.ndarray) -> np.ndarray:
        if self.coef is None:
            return np.zeros((self.members, len(items)))
        x = (self.emb[items] - self.mean) / self.scale
        return self.coef[:, :-1] @ x.T + self.coef[:, -1:]

    def quality(self, test: np.ndarray) -> float:
        if self.coef is None:
            return 0.5
        pred = self.logits(test).mean(axis=0) > 0
        truth, slices = self.task.labels[test], self.task.slices[test]
        benign = float(np.mean(~pred[~truth])) if (~truth).any() else 0.5
        recalls = [float(np.mean(pred[slices == s])) for s in sorted(set(slices[truth].tolist()))]
        return 0.5 * (benign + float(np.mean(recalls))) if recalls else benign
