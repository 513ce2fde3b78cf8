"""KTO/LoRA on the tiny model: unpaired thumbs up/down plus unrolled pairs, the reference is the base, resume,
feedback loading; and a KTO round trip through the steps: train → evaluate → gate (registry, champion policy)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, write_rows
from preference.schema import Feedback
from training.data import answer_text, load_hh_pairs, load_round_feedback, unroll_pairs
from training.kto import KTOTrainConfig, kto_rows, train_kto
from training.policy import MODEL_CARD, Policy


@pytest.fixture(scope="module")
def hh_pairs(hh_sample):
    return load_hh_pairs(hh_sample)


def thumbs(pairs, start: int = 0) -> list[Feedback]:
    """Users' thumbs: up on every other pair's chosen answer, down on the others' rejected answer."""
    out = []
    for i, p in enumerate(pairs):
        good = i % 2 == 0
        answer = p.chosen if good else p.rejected
        out.append(Feedback(id=Feedback.make_id(p.prompt_id, answer_text(answer), f"traffic:t:{start + i}"),
                            prompt_id=p.prompt_id, prompt=p.prompt, completion=answer, label=good,
                            source=f"traffic:t:{start + i}", model_version="v0001", round=1))
    return out


def tiny_cfg(**kw) -> KTOTrainConfig:
    base = dict(enabled=True, base_model="tiny-llama", max_steps=6, batch_size=4, grad_accum=1, learning_rate=5e-3,
                warmup_ratio=0.0, max_prompt_length=48, max_completion_length=24, threads=1, save_steps=3,
                logging_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    base.update(kw)
    return KTOTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hh_pairs, tiny_model):
    work = tmp_path_factory.mktemp("kto")
    stats = train_kto(hh_pairs[:6], tiny_cfg(), work, seed=0, progress=False, feedback=thumbs(hh_pairs[20:32]))
    return work, stats


def test_kto_trains_on_feedback_and_unrolled_pairs(trained):
    work, stats = trained
    assert stats["examples"] == 6 * 2 + 12 and stats["desirable"] == 6 + 6 and stats["undesirable"] == 6 + 6
    assert stats["steps"] == 6 and len(stats["losses"]) == 6
    assert stats["losses"][-1] != pytest.approx(stats["losses"][0], abs=1e-4)
    saved = load_file(work / "model" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7 and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at 0: it trained
    card = read_json(work / "model" / MODEL_CARD)
    assert card["trainer"] == "kto" and card["kind"] == "policy"
    assert not (work / "model" / "ref").exists()  # only the trained adapter is saved


def test_reference_is_the_base_and_reload_is_exact(trained, hh_pairs, tiny_model):
    work, _ = trained
    pairs = hh_pairs[300:304]
    prompts, answers = [p.prompt for p in pairs], [answer_text(p.chosen) for p in pairs]
    policy = Policy.load(work / "model")
    tuned = policy.logps(prompts, answers)[0]
    np.testing.assert_array_equal(tuned, Policy.load(work / "model").logps(prompts, answers)[0])
    with policy.reference():
        ref = policy.logps(prompts, answers)[0]
    np.testing.assert_allclose(ref, Policy.load(tiny_model).logps(prompts, answers)[0], rtol=1e-5)
    assert not np.allclose(tuned, ref)


def test_killed_kto_resumes_from_last_checkpoint(tmp_path, hh_pairs, tiny_model):
    fb = thumbs(hh_pairs[40:48])
    train_kto(hh_pairs[:4], tiny_cfg(max_steps=2, save_steps=2), tmp_path, seed=0, progress=False, feedback=fb)
    shutil.rmtree(tmp_path / "model")  # killed after the checkpoint at step 2, before the adapter was saved
    stats = train_kto(hh_pairs[:4], tiny_cfg(max_steps=4, save_steps=2), tmp_path, seed=0, progress=False,
                      feedback=fb)
    assert stats["resumed_from"] == "checkpoint-2" and stats["steps"] == 4
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()


def test_kto_needs_both_labels(tmp_path, hh_pairs):
    ups = [f for f in thumbs(hh_pairs[:6]) if f.label]
    with pytest.raises(CurateError, match="only desirable answers"):
        train_kto([], tiny_cfg(), tmp_path, feedback=ups)
    with pytest.raises(CurateError, match="got nothing"):
        train_kto([], tiny_cfg(), tmp_path)


def test_rows_unroll_pairs_and_pretruncate(hh_pairs, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    unrolled = unroll_pairs(hh_pairs[:3])
    assert [f.label for f in unrolled] == [True, False] * 3
    assert unrolled[0].completion == hh_pairs[0].chosen and unrolled[1].completion == hh_pairs[0].rejected
    assert unrolled[0].source == f"pair:{hh_pairs[0].id}" and len({f.id for f in unrolled}) == 6
    long = dataclasses.replace(unrolled[0], prompt=[{"role": "user", "content": "x " * 400 + "final question"}],
                               completion=[{"role": "assistant", "content": "start " + "y " * 400}])
    cfg = tiny_cfg(max_prompt_length=40, max_completion_length=16)
    rows = kto_rows(tok, [long] + unrolled, cfg)
    assert len(rows["prompt"]) == 7 and rows["label"] == [True, True, False, True, False, True, False]
    assert rows["prompt"][0][-1]["content"].endswith("final question")
    assert len(tok(rows["completion"][0][0]["content"], add_special_tokens=False)["input_ids"]) <= 16
    assert rows["completion"][0][0]["content"].startswith("start")


def test_round_feedback_is_read_from_the_pool_step(tmp_path, hh_pairs):
    from preference.plumbing.store import Project

    rnd = Project(tmp_path).round(1, create=True)
    assert load_round_feedback(rnd) == []  # no pool step yet
    with rnd.start_step("pool", {"test": 1}):
        pass
    assert load_round_feedback(rnd) == []  # a pool without traffic sources
    fb = thumbs(hh_pairs[:4])
    with rnd.start_step("pool", {"test": 2}, force=True) as run:
        write_rows(run.path / "feedback.parquet", [f.to_row() for f in fb])
    assert load_round_feedback(rnd) == fb


# --------------------------------------------------------------------------------------------- round trip
def test_kto_round_trip_train_evaluate_gate(tmp_path, hh_sample, hh_pairs, tiny_model):
    from curation.config import RoundConfig
    from curation.steps.evaluate import run_evaluate
    from curation.steps.gate import run_gate
    from curation.steps.train import train_step
    from preference.plumbing.store import Project
    from training.data import prompt_key, split_heldout
    from training.dpo import DPOTrainConfig
    from training.evaluate import EvalConfig
    from training.registry import GateConfig, Registry
    from training.reward import RewardTrainConfig

    run_train_dpo = train_step("dpo")
    run_train_kto = train_step("kto")
    run_train_reward = train_step("reward")

    small = dict(base_model="tiny-llama", grad_accum=1, warmup_ratio=0.0, threads=1, lora_r=4, lora_alpha=8,
                 learning_rate=5e-3, save_steps=3, report_to=[])
    cfg = RoundConfig(
        project=tmp_path / "project", seed=0,
        reward=RewardTrainConfig(**small, batch_size=4, max_steps=3, max_length=64),
        dpo=DPOTrainConfig(**small, enabled=False),
        kto=KTOTrainConfig(**small, enabled=True, batch_size=4, max_steps=3, max_prompt_length=48,
                           max_completion_length=16),
        evaluation=EvalConfig(heldout=hh_sample, heldout_size=40, bootstrap=50, flip_check_pairs=0, policy_pairs=6,
                              win_rate_prompts=2, max_new_tokens=4, threads=1, dtype="float32"),
        gate=GateConfig(metrics=["reward.accuracy", "kto.implicit_accuracy"], min_value=0.0, min_improvement=-1.0,
                        slice_tolerance=1.0),
    )
    train, heldout = split_heldout(hh_pairs, 40)
    held_keys = {prompt_key(p.prompt) for p in heldout}
    rnd = Project(cfg.project).round(1, create=True)
    fb = thumbs(train[30:40]) + thumbs(heldout[:2], start=100)  # feedback on a held-out prompt is dropped
    with rnd.start_step("pool", {"test": 1}) as run:
        write_rows(run.path / "feedback.parquet", [f.to_row() for f in fb])
    with rnd.start_step("pull", {"test": 1}) as run:
        write_rows(run.path / "pairs.parquet", [dataclasses.replace(p, round=1).to_row() for p in train[:8]])
    run_train_reward(cfg, rnd, progress=False)
    assert run_train_dpo(cfg, rnd, progress=False)["skipped"] is True  # a disabled trainer records a skip
    m = run_train_kto(cfg, rnd, progress=False)
    assert m["counts"]["feedback"] == 20 and m["counts"]["heldout_prompts_dropped"] == 0  # 10 kept × new_weight 2
    lineage = read_json(rnd.step("train_kto").file("lineage.json"))
    assert not {prompt_key(f.prompt) for f in fb if f.id in lineage["feedback_rounds"]["round-1"]} & held_keys
    assert m["train"]["examples"] == 16 * 2 + 20  # (8 pairs × new_weight 2) unrolled + feedback
    run_evaluate(cfg, rnd, progress=False)
    metrics = read_json(rnd.step("evaluate").file("metrics.json"))
    assert "dpo" not in metrics and 0 <= metrics["kto"]["implicit_accuracy"] <= 1
    assert metrics["kto"]["perplexity"] > 1 and metrics["kto"]["win_rate_vs"] == "tiny-llama"
    assert metrics["kto"]["dtype"] == "float32" and metrics["reward"]["dtype"] == "float32"
    assert rnd.step("evaluate").manifest()["hardware"]["dtype"] == "float32"
    assert "KTO implicit-reward accuracy" in rnd.step("evaluate").file("metrics.txt").read_text()
    gate = run_gate(cfg, rnd, progress=False)
    assert gate["promoted"] is True
    registry = Registry(cfg.project / "registry")
    version = registry.path(gate["version"])
    assert (version / "policy_kto" / "adapter_model.safetensors").is_file() and not (version / "policy").exists()
    assert registry.champion_policy() == version / "policy_kto"  # no DPO policy: the KTO one
    assert registry.champion_reward_model() == version / "reward"
    decision = read_json(rnd.step("gate").file("decision.json"))
    assert "kto.implicit_accuracy" in decision["comparisons"]
