"""Evaluation statistics, the flip check, and the train → evaluate → gate → failures steps end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from preference.plumbing.io import read_json, read_rows, write_rows
from preference.schema import PreferencePair, Prompt
from training.data import load_hh_pairs, prompt_key, split_heldout
from training.evaluate import (
    EvalConfig,
    bootstrap_ci,
    flip_check,
    pair_correct,
    pairwise_report,
    slice_masks,
)


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = (rng.random(50) < 0.6).astype(float)
    large = (rng.random(2000) < 0.6).astype(float)
    lo, hi = bootstrap_ci(small, n_boot=500, confidence=0.95, rng=np.random.default_rng(1))
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large, n_boot=500, confidence=0.95, rng=np.random.default_rng(1))
    assert hi2 - lo2 < (hi - lo) / 3
    assert bootstrap_ci(small, n_boot=0, confidence=0.95, rng=rng) == [small.mean(), small.mean()]


def test_pair_correct_counts_ties_half():
    np.testing.assert_array_equal(pair_correct([1, 0, 2], [0, 1, 2]), [1.0, 0.0, 0.5])


def _pair(i: int, *, slice_name="a", harmful=False, length=10) -> PreferencePair:
    return PreferencePair(id=f"p{i}", prompt_id=f"q{i}", prompt=[{"role": "user", "content": "x" * length}],
                          chosen=[{"role": "assistant", "content": f"good {i}"}],
                          rejected=[{"role": "assistant", "content": f"bad {i}"}], slice=slice_name,
                          rejected_harmful=harmful)


def test_slices_and_per_slice_accuracy():
    pairs = [_pair(i, slice_name="a" if i < 6 else "b", harmful=i % 2 == 0, length=1000 if i == 9 else 10)
             for i in range(10)]
    chosen = np.array([1.0] * 6 + [0.0] * 4)  # right on slice a, wrong on slice b
    rejected = np.zeros(10) + 0.5
    report = pairwise_report(pairs, chosen, rejected, EvalConfig(bootstrap=100, long_tail_share=0.1))
    s = report["slices"]
    assert report["accuracy"] == pytest.approx(0.6)
    assert s["slice:a"]["accuracy"] == 1.0 and s["slice:b"]["accuracy"] == 0.0
    assert s["harm_flagged:yes"]["n"] == 5 and s["harm_flagged:no"]["n"] == 5
    assert s["length:long"]["n"] == 1 and s["length:long"]["accuracy"] == 0.0
    masks = slice_masks(pairs, 0.1)
    assert masks["length:long"].tolist() == [False] * 9 + [True]


class LengthRM:
    """A stand-in reward model: longer answer = higher reward; `buggy` adds a batch-position offset."""

    def __init__(self, buggy: bool = False):
        self.buggy = buggy

    def score_pairs(self, pairs):
        c = np.array([len(p.chosen[0]["content"]) for p in pairs], dtype=float)
        r = np.array([len(p.rejected[0]["content"]) for p in pairs], dtype=float)
        if self.buggy:
            c = c + np.arange(len(pairs)) * 0.1
        return c, r


def test_flip_check_passes_a_consistent_scorer_and_catches_a_batching_bug():
    pairs = [dataclasses.replace(_pair(i), chosen=[{"role": "assistant", "content": "y" * (i % 5 + 1)}],
                                 rejected=[{"role": "assistant", "content": "z" * 3}]) for i in range(20)]
    ok_rm = LengthRM()
    c, r = ok_rm.score_pairs(pairs)
    good = flip_check(ok_rm, pairs, c, r)
    assert good["ok"] and good["accuracy"] + good["swapped_accuracy"] == pytest.approx(1.0)
    bad_rm = LengthRM(buggy=True)
    c, r = bad_rm.score_pairs(pairs)
    assert not flip_check(bad_rm, pairs, c, r)["ok"]


# ------------------------------------------------------------------------------------------------ end to end
def _round_cfg(tmp_path, hh_sample):
    from curation.config import RoundConfig
    from training.dpo import DPOTrainConfig
    from training.registry import GateConfig
    from training.reward import RewardTrainConfig

    small = dict(base_model="tiny-llama", batch_size=4, grad_accum=1, warmup_ratio=0.0, threads=1, lora_r=4,
                 lora_alpha=8)
    return RoundConfig(
        project=tmp_path / "project", seed=0,
        reward=RewardTrainConfig(**small, max_steps=6, learning_rate=5e-3, max_length=64, save_steps=3),
        dpo=DPOTrainConfig(**small, max_steps=3, learning_rate=5e-3, max_prompt_length=48,
                           max_completion_length=16, save_steps=3),
        evaluation=EvalConfig(heldout=hh_sample, heldout_size=40, bootstrap=100, flip_check_pairs=8, policy_pairs=6,
                              win_rate_prompts=2, max_new_tokens=4, threads=1, dtype="float32"),
        gate=GateConfig(min_value=0.0, min_improvement=-1.0, slice_tolerance=1.0),
    )


def _write_pull(rnd, pairs: list[PreferencePair]) -> None:
    run = rnd.start_step("pull", {"test": rnd.number})
    with run:
        write_rows(run.path / "pairs.parquet", [dataclasses.replace(p, round=rnd.number).to_row() for p in pairs])


def test_train_evaluate_gate_end_to_end(tmp_path, hh_sample, tiny_model):
    from curation.steps.evaluate import run_evaluate
    from curation.steps.failures import run_failures
    from curation.steps.gate import run_gate
    from curation.steps.train import train_step
    from preference.plumbing.store import Project
    from training.registry import Registry

    run_train_dpo = train_step("dpo")
    run_train_reward = train_step("reward")

    cfg = _round_cfg(tmp_path, hh_sample)
    pairs = load_hh_pairs(hh_sample)
    train, heldout = split_heldout(pairs, 40)
    project = Project(cfg.project)

    r1 = project.round(1, create=True)
    _write_pull(r1, train[:20] + heldout[:1])  # one pair on a held-out prompt: must not be trained on
    m = run_train_reward(cfg, r1, progress=False)
    assert m["counts"]["heldout_prompts_dropped"] == 1 and m["counts"]["new"] == 40  # 20 pairs × new_weight 2
    assert run_train_reward(cfg, r1, progress=False)["finished_at"] == m["finished_at"]  # finished: skipped
    lineage = read_json(r1.step("train_reward").file("lineage.json"))
    assert sorted(lineage["rounds"]["round-1"]) == sorted(p.id for p in train[:20])
    run_train_dpo(cfg, r1, progress=False)
    from training.common import tensorboard_available

    if tensorboard_available():  # report_to's default: TensorBoard event files in each train step's folder
        for step in ("train_reward", "train_dpo"):
            assert list((r1.step(step).path / "tensorboard").rglob("events.out.tfevents.*")), step
    run_evaluate(cfg, r1, progress=False)
    metrics = read_json(r1.step("evaluate").file("metrics.json"))
    assert metrics["reward"]["slices"]["slice:harmless"]["n"] == 40 and metrics["reward"]["flip_check"]["ok"]
    assert 0 <= metrics["dpo"]["implicit_accuracy"] <= 1 and metrics["dpo"]["perplexity"] > 1
    assert metrics["dpo"]["win_rate_vs"] == "tiny-llama"
    # the policy is read as DPO saw it in training (48 prompt / 16 answer tokens), not at the 192/128 defaults
    from training.evaluate import evaluate_policy

    direct = {n: evaluate_policy(r1.step("train_dpo").path / "model", "tiny-llama", None, heldout, cfg.evaluation,
                                 beta=cfg.dpo.beta, **lengths)["perplexity"]
              for n, lengths in {"section": dict(max_prompt=48, max_answer=16), "defaults": {}}.items()}
    assert metrics["dpo"]["perplexity"] == pytest.approx(direct["section"])
    assert direct["section"] != pytest.approx(direct["defaults"])
    gate = run_gate(cfg, r1, progress=False)
    assert gate["promoted"] is True and gate["version"] == "v0001"
    registry = Registry(cfg.project / "registry")
    assert registry.champion() == "v0001"
    assert (registry.path("v0001") / "reward" / "member-0" / "adapter_model.safetensors").is_file()
    assert (registry.path("v0001") / "policy" / "adapter_model.safetensors").is_file()
    assert read_json(registry.path("v0001") / "lineage.json")["reward"]["counts"]["new"] == 40

    # failures: exactly the round's (non-held-out) pairs the reward model orders wrongly, one prompt each
    run_failures(cfg, r1, progress=False)  # a step of its own since failures joined STEPS
    scores = [s for s in read_rows(r1.step("evaluate").file("pair_scores.parquet")) if s["split"] == "train"]
    assert len(scores) == 20
    wrong = {s["prompt_id"] for s in scores if not s["correct"]}
    failures = [Prompt.from_row(r) for r in read_rows(r1.step("failures").file("prompts.parquet"))]
    assert {f.id for f in failures} == wrong
    assert all(f.source == "failure:round-1" and f.metadata["reason"] for f in failures)
    held_keys = {prompt_key(p.prompt) for p in heldout}
    assert not any(prompt_key(f.messages) in held_keys for f in failures)

    # round 2: replay of round 1, champion scored on the same held-out set, gate against it
    r2 = project.round(2, create=True)
    _write_pull(r2, train[20:30])
    m2 = run_train_reward(cfg, r2, progress=False)
    assert m2["counts"]["new"] == 20 and m2["counts"]["replay"] == 10  # ratio 1.0 of 10 new pairs, weight 1
    run_train_dpo(cfg, r2, progress=False)
    run_evaluate(cfg, r2, progress=False)
    champ = read_json(r2.step("evaluate").file("champion_metrics.json"))
    assert champ["version"] == "v0001"
    # the champion's own evaluation was on these pairs with these settings: reused, not scored again
    assert champ["source"] == "registry" and r2.step("evaluate").manifest()["champion"]["source"] == "registry"
    assert champ["reward"] == {k: v for k, v in metrics["reward"].items() if k != "train_pairs_accuracy"}
    # other settings (here the bootstrap): scored again, and the same model on the same set scores the same
    other = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, bootstrap=50))
    run_evaluate(other, r2, force=True, progress=False)
    rescored = read_json(r2.step("evaluate").file("champion_metrics.json"))
    assert rescored["source"] == "scored" and rescored["reward"]["accuracy"] == pytest.approx(champ["reward"]["accuracy"])
    run_evaluate(cfg, r2, force=True, progress=False)
    gate2 = run_gate(cfg, r2, progress=False)
    decision = read_json(r2.step("gate").file("decision.json"))
    assert decision["version"] == "v0002" and gate2["promoted"] == decision["promote"]
    assert registry.champion() == ("v0002" if decision["promote"] else "v0001")
