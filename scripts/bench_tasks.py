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
- preference tasks: `curation.acquisition.ensemble.BTEnsemble` (bootstrap Bradley–Terry logistic models on answer-feature
  differences); the quality is held-out pairwise accuracy on the test prompts' non-tie human judgements;
- moderation: a bootstrap ensemble of class-balanced logistic regressions (a harm classifier); the quality is the
  rare-slice balanced accuracy ½ (accuracy on benign prompts + mean over harm slices of their recall).
Both give per item `reward_margin` (small = the model cannot tell: the smallest |mean reward gap| of an item's
open comparisons, or |mean logit| of the classifier) and `reward_disagreement` (std across members of that gap /
logit, largest over open comparisons), plus member rewards per answer for the completion choosers.

Features (`--features`): `tfidf` (TF-IDF 1–2-grams of prompt + answer, TruncatedSVD to 256-d; seconds) or
`smollm2` (SmolLM2-135M-Instruct final hidden state mean-pooled over the answer tokens — over the prompt for
moderation — plus the answer's mean token logprob and entropy; at most 96 answer tokens after the prompt's last 32;
at `--dtype` (default `auto`: bf16 where the hardware computes it natively, else fp32; part of the cache key);
computed once, niced, resumable, cached under `~/.cache/curate/bench-features/`; see `smollm2_features`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curation.acquisition.ensemble import BTEnsemble, EnsembleConfig, Pairs, heldout_loglik
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


def minilm_features(task: Task, *, max_tokens: int = 256, chunk: int = 256, progress: bool = True,
                    dtype: str = "auto") -> dict[str, np.ndarray]:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalized) of each target text alone (an answer without
    its prompt, or a prompt): how `curate score` embeds completions and prompts with the shipped configs'
    `scoring.embedding_model`, so the reward-proxy strategies see the features rounds give them. Cached like
    the others (keyed by the texts, the cap and the dtype); no LM signals. `dtype`: as a backend's (`auto` =
    bf16 only where the hardware computes it natively)."""
    from preference.plumbing.hardware import resolve_dtype

    context, target = texts_for_features(task)
    dtype = resolve_dtype(dtype)
    path = _cache_path("minilm", task, [target, max_tokens] + ([dtype] if dtype != "float32" else []))
    if path.is_file():
        return _load(path)
    from tqdm import tqdm

    from curation.backends import BackendSettings, load_backend
    from training.models import MINILM

    vecs = []
    with load_backend(MINILM, BackendSettings(name="sentence-transformers", dtype=dtype)) as backend:
        for start in tqdm(range(0, len(target), chunk), disable=not progress, desc=f"MiniLM features ({task.name})"):
            vecs.append(backend.embed(target[start : start + chunk], max_tokens))
    return _save(path, {"emb": np.concatenate(vecs)})


def smollm2_cache_path(task: Task, max_tokens: int, model_name: str, dtype: str) -> Path:
    """Where `smollm2_features` caches a task's features: keyed by the texts, the cap, the model and the resolved
    dtype (fp32 keeps the key it had before the dtype was part of it: those caches are fp32 ones)."""
    context, target = texts_for_features(task)
    return _cache_path("smollm2", task, [context, target, max_tokens, "96+32 tokens, mean of final norm"]
                       + ([model_name] if model_name != "smollm2-135m-instruct" else [])
                       + ([dtype] if dtype != "float32" else []))


def smollm2_features(task: Task, *, max_tokens: int = 128, batch_size: int = 16, progress: bool = True,
                     model_name: str = "smollm2-135m-instruct", dtype: str = "auto") -> dict[str, np.ndarray]:
    """SmolLM2-135M-Instruct features of each target text (an answer after its ChatML prompt, or a prompt as the
    user turn): the final (normed) hidden state mean-pooled over the target's tokens — a mean, not the last token,
    because answers are truncated and a mean over what is kept stays comparable across lengths — plus the target's
    mean token logprob and mean predictive entropy (the LM signals `low_logprob` / `entropy` use).

    Token cap: at most `max_tokens` (128) tokens per text — the target's first `max_tokens` × 3/4 (96) tokens after
    the prompt's *last* `max_tokens` / 4 (32) tokens in the chat template (the end of the last user turn, next to
    the answer, is what conditions it most). On the shipped data this keeps 89 % of HH answers, 51 % of qa-feedback
    answers and 57 % of moderation prompts whole, at ~70–100 tokens per text: the cap is what makes the features
    take minutes rather than hours on 2 CPU cores.
    Precision: `dtype` as a backend's (`auto` = bf16 only where the hardware computes it natively, else fp32);
    the model runs in it, the pooled states, logprobs and entropies are reduced in fp32.
    Resumable: every batch is written to `<cache>.parts/` as it finishes (.npz, no pickle), so a killed run
    recomputes nothing already done; the merged .npz is written last, keyed by the hash of the texts, the cap and
    the dtype (features of different precisions never share a file).
    The process lowers its CPU priority (os.nice) while computing, so it yields to interactive work."""
    from preference.plumbing.hardware import resolve_dtype

    context, target = texts_for_features(task)
    dtype = resolve_dtype(dtype)
    path = smollm2_cache_path(task, max_tokens, model_name, dtype)
    if path.is_file():
        return _load(path)
    import time

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preference.plumbing.hardware import describe, hardware_summary, resolve_threads
    from training.models import resolve_model

    os.nice(max(0, 10 - os.nice(0)))  # niceness 10 (not 10 more when already started with `nice`)
    threads, dtype_name = resolve_threads(None), dtype
    torch.set_num_threads(threads)
    model_dir = resolve_model(model_name, fetch=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name)).eval()
    seqs = []
    for c, t in zip(context, target, strict=True):
        if c:  # an answer after its prompt, as the chat model would have produced it
            head = tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        else:  # a prompt, as a user turn
            head = "<|im_start|>user\n"
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        body_ids = tok(t + "<|im_end|>", add_special_tokens=False)["input_ids"][: max_tokens * 3 // 4]
        ids = head_ids[-max(1, max_tokens // 4):] + body_ids
        seqs.append((ids, len(ids) - len(body_ids)))
    order = np.argsort([len(s[0]) for s in seqs], kind="stable")
    n, dim = len(seqs), model.config.hidden_size
    parts = path.with_name(path.stem + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    batches = [order[b : b + batch_size] for b in range(0, n, batch_size)]
    t0, done_tokens, computed = time.perf_counter(), 0, 0
    bar = tqdm(batches, disable=not progress, desc=f"SmolLM2 features ({task.name})", unit="batch")
    with torch.inference_mode():
        for k, rows in enumerate(bar):
            part = parts / f"{k:05d}.npz"
            if part.is_file():
                continue
            lengths = [len(seqs[r][0]) for r in rows]
            ids = torch.full((len(rows), max(lengths)), tok.pad_token_id or 0)
            mask = torch.zeros_like(ids)
            target_mask = torch.zeros(ids.shape, dtype=torch.bool)
            for j, r in enumerate(rows):
                seq, start = seqs[r]
                ids[j, : len(seq)] = torch.tensor(seq)
                mask[j, : len(seq)] = 1
                target_mask[j, start : len(seq)] = True
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # the model's dtype
            w = target_mask[..., None].float()
            emb = (hidden.float() * w).sum(1) / w.sum(1)
            # token t is predicted at position t − 1: the LM head only where a target token is predicted
            pred = torch.zeros_like(target_mask)
            pred[:, :-1] = target_mask[:, 1:]
            logp = torch.log_softmax(model.lm_head(hidden[pred]).float(), dim=-1)
            token_lp = logp.gather(1, ids[:, 1:][target_mask[:, 1:]][:, None])[:, 0]
            token_h = -(logp.exp() * logp).sum(-1)
            owner = torch.arange(len(rows))[:, None].expand_as(pred)[pred]
            count = torch.bincount(owner, minlength=len(rows)).float()
            logprob = torch.zeros(len(rows)).index_add_(0, owner, token_lp) / count
            entropy = torch.zeros(len(rows)).index_add_(0, owner, token_h) / count
            tmp = part.with_name(part.stem + ".partial.npz")
            np.savez(tmp, rows=rows, emb=emb.numpy(), logprob=logprob.numpy(), entropy=entropy.numpy())
            tmp.rename(part)
            computed += len(rows)
            done_tokens += sum(lengths)
            rate = computed / (time.perf_counter() - t0)
            bar.set_postfix_str(f"{rate:.1f} texts/s")
    seconds = time.perf_counter() - t0
    if computed:
        print(f"SmolLM2 features ({task.name}): {computed} texts, {done_tokens} tokens in {seconds:.0f} s = "
              f"{computed / seconds:.1f} texts/s, {done_tokens / seconds:.0f} tokens/s (cap {max_tokens} tokens, "
              f"batch {batch_size}) on {describe(hardware_summary(dtype_name, threads))}", flush=True)
    out = {"emb": np.zeros((n, dim), np.float32), "logprob": np.zeros(n, np.float32),
           "entropy": np.zeros(n, np.float32)}
    for k in range(len(batches)):
        with np.load(parts / f"{k:05d}.npz", allow_pickle=False) as data:
            for key in out:
                out[key][data["rows"]] = data[key]
    _save(path, out)
    for part in parts.glob("*.npz"):
        part.unlink()
    parts.rmdir()
    return out


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

    def heldout(self, units: list[tuple[int, int, int]]):
        """The adaptive strategy's held-out score over label `units` (comparisons): score(train, test) = mean
        log-likelihood of the test units' non-tie judgements under one Bradley–Terry model fitted on the train
        units' (`curation.acquisition.ensemble.heldout_loglik`, as rounds measure it)."""

        def pairs(rows) -> Pairs:
            idx = np.array([(a, b) if o == 1 else (b, a) for a, b, o in (units[r] for r in rows) if o != 0],
                           dtype=np.int64).reshape(-1, 2)
            return Pairs(self.emb[idx[:, 0]], self.emb[idx[:, 1]])

        return lambda train, test: heldout_loglik(pairs(train), pairs(test), self.config.c)

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

    def heldout(self, units: list[int]):
        """The adaptive strategy's held-out score over labelled `units` (items): score(train, test) = the test
        items' class-balanced mean log-likelihood (mean over classes present) under one class-balanced logistic
        regression fitted on the train items (NaN when train lacks a class)."""
        from sklearn.linear_model import LogisticRegression

        items = np.asarray(units, dtype=np.int64)

        def score(train, test) -> float:
            tr, te = items[np.asarray(train, dtype=np.int64)], items[np.asarray(test, dtype=np.int64)]
            y = self.task.labels[tr]
            if len(te) == 0 or len(set(y.tolist())) < 2:
                return float("nan")
            lr = LogisticRegression(C=self.c, class_weight="balanced", max_iter=500)
            lr.fit((self.emb[tr] - self.mean) / self.scale, y)
            logp = lr.predict_log_proba((self.emb[te] - self.mean) / self.scale)
            truth = self.task.labels[te]
            col = {bool(c): j for j, c in enumerate(lr.classes_)}
            own = logp[np.arange(len(te)), [col[bool(t)] for t in truth]]
            return float(np.mean([own[truth == c].mean() for c in (False, True) if (truth == c).any()]))

        return score

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
