"""Acquisition benchmark: does a strategy reach random's accuracy with fewer labels? (HH-harmless pairs)

For each seed the 1,311 usable pairs of data/hh-harmless-dev.jsonl.gz are split into a held-out test set
(--test pairs) and an unlabelled pool. Every strategy starts from the same --init random labelled pairs, then
runs --rounds rounds of --budget labels: fit the reward model on the labelled pairs, score the pool, let the
strategy pick --budget items, have the simulated annotator (preference/simulated.py, answering from the HH
labels, --noise 0 by default) label them. After every fit, the held-out pairwise accuracy of the reward model
(mean reward of chosen > rejected) is recorded. The table shows, per strategy, the labels used, the final
accuracy (mean ± 95% t-interval over seeds), the area under the accuracy curve, and the labels the strategy
needed to reach random's final mean accuracy (first crossing of the seed-averaged curve, linear interpolation
between rounds; "—" = not reached; "saved" = random's own labels-to-target, measured the same way, minus the
strategy's). AUC = mean accuracy over the whole curve; ΔAUC is paired by seed (same split, same initial labels).

Each strategy picks its whole budget here (no random arm inside a strategy run: `random` is the baseline).

Features (computed once, cached as .npy under `training.models.cache_dir()/features`):
- `--features smollm2` (default): SmolLM2-135M-Instruct (bf16, transformers) on prompt + answer in ChatML,
  last hidden state mean-pooled over the answer tokens (576-d), plus the answer's mean token logprob and mean
  entropy (the signals of the low_logprob / entropy strategies). ~10 min on 2 CPU cores the first time.
- `--features tfidf`: cheap fallback, TF-IDF (1–2-grams) of prompt + answer reduced to 256-d by TruncatedSVD;
  no logprob/entropy signals (strategies needing them are skipped). Seconds.

Item signals per pool pair (the two answers play the two "completions" of a prompt):
reward_margin / reward_disagreement from `curation.ensemble.prompt_reward_signals` under the current reward
model, mean_logprob / mean_entropy averaged over the two answers, embedding = mean of the two answer features.

Reward model: `--reward-model curation.ensemble:BTEnsemble` (default: the fast bootstrap Bradley–Terry ensemble
on embedding differences). Any class with the `curation.ensemble.RewardModel` protocol can be named instead
(`module:Class`, built with no arguments): `fit(pairs: Pairs) -> self` and `reward(features) -> (K, N) array`.

The same benchmark with the TRL reward model (training/reward.py: TRL RewardTrainer + LoRA on SmolLM2):

    python scripts/bench_acquisition.py --reward-model trl --seeds 2 --rounds 4 --budget 25 \
        --strategies random,reward_margin,kcenter [--trl-base smollm2-135m-instruct] [--trl-ensemble 3]

`trl` is `TRLReward` below: every fit trains a fresh LoRA reward model (K = --trl-ensemble bootstrap heads) on
the labelled pairs as conversations, and `reward` returns each head's reward of prompt + answer conversations
(the pool's features become object arrays of conversations; diversity strategies keep the cached embeddings).
Expect minutes per fit on CPU (measured ~0.75 pairs/s training, ~2 pairs/s scoring with SmolLM2), i.e. hours
for the default grid; with one head (K = 1) reward_disagreement is 0 and not informative.
`--trl-base tiny-llama` runs the same path in seconds (a smoke test, not a benchmark).

    python scripts/bench_acquisition.py                       # defaults: 10 seeds, 25 init + 8 × 25 labels
    python scripts/bench_acquisition.py --features tfidf --seeds 3
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from preference.plumbing.env import apply_env_defaults  # noqa: E402

apply_env_defaults()  # before torch is imported

from curation.ensemble import BTEnsemble, EnsembleConfig, Pairs, prompt_reward_signals  # noqa: E402
from curation.strategies import Items, build_strategy  # noqa: E402
from preference.plumbing.errors import CurateError  # noqa: E402
from preference.plumbing.io import read_jsonl  # noqa: E402
from preference.schema import AnnotationRecord, Completion, Prompt, parse_hh_pair, prompt_text  # noqa: E402
from preference.simulated import REFERENCE_CHOSEN, REFERENCE_REJECTED, SimulatedAnnotator, SimulatedConfig  # noqa: E402

DATA = ROOT / "data" / "hh-harmless-dev.jsonl.gz"
DEFAULT_STRATEGIES = (
    "random,reward_margin,reward_disagreement,low_logprob,entropy,kcenter,kmeans++,under_dense,hybrid"
)
HYBRID_WEIGHTS = {"reward_margin": 1.0, "reward_disagreement": 1.0}
NEEDS_LM = {"low_logprob", "entropy"}


def load_hh(path: Path) -> list[dict]:
    """HH rows → [{"prompt": messages, "chosen": str, "rejected": str}] (rows whose prompts differ are skipped)."""
    out = []
    for row in read_jsonl(path):
        try:
            messages, chosen, rejected = parse_hh_pair(row)
        except ValueError:  # malformed, or not a comparison of two answers to one prompt: not a usable pair
            continue
        out.append({"prompt": messages, "chosen": chosen, "rejected": rejected})
    return out


def smollm2_features(
    pairs: list[dict], *, max_tokens: int = 256, batch_size: int = 8, progress: bool = True
) -> dict[str, np.ndarray]:
    """Mean-pooled last hidden states of SmolLM2 over the answer tokens of prompt+answer, plus the answer's mean
    token logprob and mean entropy under SmolLM2. Returns arrays for 'chosen' and 'rejected' (cached as .npy)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.models import SMOLLM2, cache_dir, resolve_model

    key = hashlib.sha256(repr([(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]).encode()).hexdigest()[:12]
    folder = cache_dir() / "features" / f"smollm2-hh-{key}-t{max_tokens}"
    names = ("chosen_emb", "rejected_emb", "chosen_logprob", "rejected_logprob", "chosen_entropy",
             "rejected_entropy")
    if all((folder / f"{n}.npy").is_file() for n in names):
        return {n: np.load(folder / f"{n}.npy", allow_pickle=False) for n in names}
    path = resolve_model(SMOLLM2, fetch=False)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    items = []  # (pair index, side, token ids, answer start)
    for i, p in enumerate(pairs):
        head = tok.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            ans_ids = tok(p[side] + "<|im_end|>", add_special_tokens=False)["input_ids"][: max_tokens // 2]
            keep = max_tokens - len(ans_ids)
            ids = head_ids[-keep:] + ans_ids
            items.append((i, side, ids, len(ids) - len(ans_ids)))
    order = sorted(range(len(items)), key=lambda j: len(items[j][2]))
    dim = model.config.hidden_size
    out = {n: np.zeros((len(pairs), dim) if n.endswith("emb") else len(pairs), np.float32) for n in names}
    with torch.inference_mode():
        for b in tqdm(range(0, len(order), batch_size), disable=not progress, desc="SmolLM2 features"):
            batch = [items[j] for j in order[b : b + batch_size]]
            width = max(len(x[2]) for x in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, _, seq, _) in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = res.hidden_states[-1].float()
            logp = torch.log_softmax(res.logits.float(), dim=-1)
            for r, (i, side, seq, start) in enumerate(batch):
                n = len(seq)
                out[f"{side}_emb"][i] = hidden[r, start:n].mean(0).numpy()
                targets = torch.tensor(seq[start:n])
                lp = logp[r, start - 1 : n - 1]
                out[f"{side}_logprob"][i] = lp.gather(1, targets[:, None]).mean().item()
                out[f"{side}_entropy"][i] = -(lp.exp() * lp).sum(-1).mean().item()
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        np.save(folder / f"{n}.npy", out[n], allow_pickle=False)
    return out


def tfidf_features(pairs: list[dict], dim: int = 256) -> dict[str, np.ndarray]:
    """Cheap fallback: TF-IDF of prompt + answer, reduced by TruncatedSVD (fit on all texts, no labels)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [f"{prompt_text(p['prompt'])}\n\nAssistant: {p[side]}" for side in ("chosen", "rejected") for p in pairs]
    x = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(texts)
    z = TruncatedSVD(n_components=dim, random_state=0).fit_transform(x).astype(np.float32)
    return {"chosen_emb": z[: len(pairs)], "rejected_emb": z[len(pairs) :]}


def conversations(pairs: list[dict], side: str) -> np.ndarray:
    """(N,) object array of prompt + answer conversations (lists of messages), as TRL reward models take them."""
    out = np.empty(len(pairs), dtype=object)
    for i, p in enumerate(pairs):
        out[i] = [*p["prompt"], {"role": "assistant", "content": p[side]}]
    return out


class TRLReward:
    """`RewardModel` protocol around training/reward.py: `fit` trains a LoRA reward model with TRL's
    RewardTrainer on the pairs (conversations), `reward` returns the heads' rewards as a (K, N) array."""

    def __init__(self, base_model: str = "smollm2-135m-instruct", ensemble: int = 1, seed: int = 0):
        from training.reward import RewardTrainConfig

        self.config = RewardTrainConfig(base_model=base_model, ensemble=ensemble, threads=2)
        self.seed = seed
        self.model = None
        self._tmp = None

    def fit(self, pairs: Pairs) -> TRLReward:
        import tempfile

        from preference.schema import PreferencePair
        from training.models import cache_dir
        from training.reward import RewardModel, train_reward_model

        rows = [
            PreferencePair(id=f"bench-{i}", prompt_id=f"bench-{i}", prompt=list(c[:-1]), chosen=[c[-1]],
                           rejected=[r[-1]])
            for i, (c, r) in enumerate(zip(pairs.chosen, pairs.rejected, strict=True))
        ]
        (cache_dir() / "bench-trl").mkdir(parents=True, exist_ok=True)
        # Scratch folder, removed when this object is garbage-collected (TemporaryDirectory's finalizer).
        self._tmp = tempfile.TemporaryDirectory(dir=cache_dir() / "bench-trl")
        work = Path(self._tmp.name)
        train_reward_model(rows, self.config, work, seed=self.seed, progress=False)
        self.model = RewardModel.load(work / "model")
        return self

    def reward(self, features: np.ndarray) -> np.ndarray:
        return self.model.member_rewards(list(features))


def load_object(spec: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CurateError(f"--reward-model {spec!r}: cannot import ({exc}); expected module:Class") from exc


def simulated_labels(annotator: SimulatedAnnotator, pairs: list[dict], idx: np.ndarray, rng) -> np.ndarray:
    """Ask the simulated annotator about pool items `idx`; returns True where it prefers the HH 'chosen'."""
    records = []
    for i in idx:
        p = pairs[i]
        prompt = Prompt(id=f"hh{i}", messages=p["prompt"])
        comps = [
            Completion(id=f"hh{i}-c", prompt_id=prompt.id, model=REFERENCE_CHOSEN, text=p["chosen"]),
            Completion(id=f"hh{i}-r", prompt_id=prompt.id, model=REFERENCE_REJECTED, text=p["rejected"]),
        ]
        if rng.random() < 0.5:
            comps.reverse()
        records.append(AnnotationRecord(prompt=prompt, completions=comps))
    responses = annotator.annotate(records)
    return np.array([r.ranks[f"{r.record_id}-c"] == 1 for r in responses], dtype=bool)


class Bench:
    """One seed's data split and the acquisition loop."""

    def __init__(self, pairs, feats, args, seed: int):
        self.args = args
        self.seed = seed
        self.pairs = pairs
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(pairs))
        self.test, self.pool = order[: args.test], order[args.test :]
        self.init = rng.choice(len(self.pool), size=args.init, replace=False)
        self.feats = feats
        self.texts = None
        if args.reward_model == "trl":
            self.texts = {side: conversations(pairs, side) for side in ("chosen", "rejected")}
        self.annotator = SimulatedAnnotator(
            SimulatedConfig(source=DATA, annotators=1, noise=args.noise, seed=seed)
        )

    def reward_inputs(self, side: str, rows: np.ndarray) -> np.ndarray:
        source = self.texts if self.texts is not None else {s: self.feats[f"{s}_emb"] for s in ("chosen", "rejected")}
        return source[side][rows]

    def new_model(self):
        if self.args.reward_model == "trl":
            return TRLReward(self.args.trl_base, self.args.trl_ensemble, seed=self.seed)
        factory = load_object(self.args.reward_model)
        if factory is BTEnsemble:
            return BTEnsemble(EnsembleConfig(members=self.args.members, c=self.args.c, seed=self.seed))
        return factory()

    def fit(self, rows: np.ndarray, prefers_chosen: np.ndarray):
        c, r = self.reward_inputs("chosen", rows), self.reward_inputs("rejected", rows)
        flip = ~prefers_chosen  # a (noisy) annotator may prefer the HH-rejected answer
        chosen = np.where(flip[:, None], r, c) if c.ndim == 2 else np.where(flip, r, c)
        rejected = np.where(flip[:, None], c, r) if c.ndim == 2 else np.where(flip, c, r)
        return self.new_model().fit(Pairs(chosen, rejected))

    def accuracy(self, model) -> float:
        chosen = model.reward(self.reward_inputs("chosen", self.test))
        rejected = model.reward(self.reward_inputs("rejected", self.test))
        margin = (chosen - rejected).mean(axis=0)
        return float(np.mean((margin > 0) + 0.5 * (margin == 0)))

    def items(self, model, rows: np.ndarray) -> Items:
        n = len(rows)
        feats = np.concatenate([self.reward_inputs("chosen", rows), self.reward_inputs("rejected", rows)])
        signals = prompt_reward_signals(model.reward(feats), np.r_[np.arange(n), np.arange(n)], n)
        emb = (self.feats["chosen_emb"][rows] + self.feats["rejected_emb"][rows]) / 2.0
        if "chosen_logprob" in self.feats:
            signals["mean_logprob"] = (self.feats["chosen_logprob"][rows] + self.feats["rejected_logprob"][rows]) / 2
            signals["mean_entropy"] = (self.feats["chosen_entropy"][rows] + self.feats["rejected_entropy"][rows]) / 2
        return Items(ids=rows, signals=signals, embeddings=emb)

    def run(self, spec: str) -> list[tuple[int, float]]:
        args = self.args
        strategy = build_strategy(spec, weights=HYBRID_WEIGHTS, candidate_factor=args.candidate_factor)
        rng = np.random.default_rng([self.seed, 1])
        label_rng = np.random.default_rng([self.seed, 2])
        labelled = list(self.pool[self.init])
        labels = list(simulated_labels(self.annotator, self.pairs, np.array(labelled), label_rng))
        curve = []
        for r in range(args.rounds + 1):
            model = self.fit(np.array(labelled), np.array(labels))
            curve.append((len(labelled), self.accuracy(model)))
            if r == args.rounds:
                break
            unlabelled = np.setdiff1d(self.pool, labelled)
            items = self.items(model, unlabelled)
            lab = np.array(labelled)
            items.labelled = (self.feats["chosen_emb"][lab] + self.feats["rejected_emb"][lab]) / 2.0
            picks = unlabelled[strategy.select(items, args.budget, rng)]
            labelled += picks.tolist()
            labels += simulated_labels(self.annotator, self.pairs, picks, label_rng).tolist()
        return curve


def labels_to_reach(labels: np.ndarray, acc: np.ndarray, target: float) -> float | None:
    """First label count (linear interpolation) where the mean curve reaches `target`."""
    for j in range(len(acc)):
        if acc[j] >= target:
            if j == 0:
                return float(labels[0])
            frac = (target - acc[j - 1]) / (acc[j] - acc[j - 1])
            return float(labels[j - 1] + frac * (labels[j] - labels[j - 1]))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", choices=("smollm2", "tfidf"), default="smollm2")
    ap.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated strategy specs")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--budget", type=int, default=25, help="labels per round")
    ap.add_argument("--init", type=int, default=25, help="random labelled pairs every strategy starts from")
    ap.add_argument("--test", type=int, default=300, help="held-out pairs")
    ap.add_argument("--noise", type=float, default=0.0, help="simulated annotator flip rate")
    ap.add_argument("--members", type=int, default=5, help="BT ensemble members")
    ap.add_argument("--c", type=float, default=0.02, help="BT logistic regression C (inverse L2 strength)")
    ap.add_argument("--candidate-factor", type=float, default=4.0, help="hybrid: top factor·k, then k-center")
    ap.add_argument("--reward-model", default="curation.ensemble:BTEnsemble",
                    help="module:Class with the RewardModel protocol, or 'trl' (TRL RewardTrainer + LoRA)")
    ap.add_argument("--trl-base", default="smollm2-135m-instruct", help="--reward-model trl: base model")
    ap.add_argument("--trl-ensemble", type=int, default=1, help="--reward-model trl: LoRA heads (K)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    pairs = load_hh(DATA)
    t0 = time.perf_counter()
    feats = smollm2_features(pairs, progress=not args.quiet) if args.features == "smollm2" else tfidf_features(pairs)
    print(f"{len(pairs)} HH pairs, features={args.features} ({feats['chosen_emb'].shape[1]}-d, "
          f"{time.perf_counter() - t0:.1f} s); test={args.test}, init={args.init}, {args.rounds} rounds × "
          f"{args.budget}, {args.seeds} seeds, reward model {args.reward_model} (C={args.c}, K={args.members})")
    specs = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if "chosen_logprob" not in feats:
        skipped = [s for s in specs if s in NEEDS_LM]
        specs = [s for s in specs if s not in NEEDS_LM]
        if skipped:
            print(f"skipped (need SmolLM2 logprob/entropy features): {', '.join(skipped)}")
    if "random" not in specs:
        specs.insert(0, "random")
    curves: dict[str, list] = {s: [] for s in specs}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        bench = Bench(pairs, feats, args, seed)
        for spec in specs:
            curves[spec].append(bench.run(spec))
        print(f"  seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    from scipy.stats import t as student_t

    labels = np.array([n for n, _ in curves["random"][0]])
    acc = {s: np.array([[a for _, a in c] for c in curves[s]]) for s in specs}  # (seeds, rounds+1)
    target = acc["random"][:, -1].mean()
    half = student_t.ppf(0.975, args.seeds - 1) / np.sqrt(args.seeds) if args.seeds > 1 else float("nan")
    random_need = labels_to_reach(labels, acc["random"].mean(axis=0), target)
    print(f"\nheld-out pairwise accuracy ({args.test} pairs), mean ± 95% CI over {args.seeds} seeds; "
          f"target = random's final accuracy {target:.3f}; random's mean curve first reaches it at "
          f"{random_need:.0f} labels\n")
    head = (f"{'strategy':<28} {'labels':>6} {'final acc':>15} {'AUC':>6} {'ΔAUC vs random (paired)':>24} "
            f"{'labels to target':>16} {'saved':>6}")
    print(head)
    print("-" * len(head))
    for s in specs:
        final = acc[s][:, -1]
        ci = half * final.std(ddof=1) if args.seeds > 1 else float("nan")
        auc = acc[s].mean(axis=1)  # per seed: mean accuracy over the curve
        delta = auc - acc["random"].mean(axis=1)
        d_ci = half * delta.std(ddof=1) if args.seeds > 1 else float("nan")
        need = labels_to_reach(labels, acc[s].mean(axis=0), target)
        need_txt = "—" if need is None else f"{need:.0f}"
        saved = "—" if need is None else f"{random_need - need:+.0f}"
        print(f"{s:<28} {labels[-1]:>6} {final.mean():>7.3f} ± {ci:.3f} {auc.mean():>6.3f} "
              f"{delta.mean():>+15.3f} ± {d_ci:.3f} {need_txt:>16} {saved:>6}")
    print("\nmean accuracy by labels used:")
    print(f"{'strategy':<28} " + " ".join(f"{n:>6}" for n in labels))
    for s in specs:
        print(f"{s:<28} " + " ".join(f"{a:>6.3f}" for a in acc[s].mean(axis=0)))


if __name__ == "__main__":
    main()
