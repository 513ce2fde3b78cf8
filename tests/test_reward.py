"""Reward model training (tiny model): loss moves, every LoRA parameter trains, save/reload, resume, ensemble;
held-out split, replay mixing, pre-truncation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from preference.plumbing.errors import CurateError
from preference.schema import PreferencePair
from training.common import trl_args
from training.data import (
    ReplayConfig,
    encode_pair,
    load_hh_pairs,
    mix_replay,
    prompt_key,
    split_heldout,
)
from training.reward import RewardModel, RewardTrainConfig, train_reward_model


@pytest.fixture(scope="module")
def hh_pairs(hh_sample):
    return load_hh_pairs(hh_sample)


def tiny_cfg(**kw) -> RewardTrainConfig:
    base = dict(base_model="tiny-llama", max_steps=8, batch_size=4, grad_accum=1, learning_rate=5e-3,
                warmup_ratio=0.0, max_length=64, threads=1, save_steps=4, logging_steps=1, lora_r=4, lora_alpha=8,
                lora_dropout=0.0)
    base.update(kw)
    return RewardTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hh_pairs, tiny_model):
    work = tmp_path_factory.mktemp("rm")
    stats = train_reward_model(hh_pairs[:32], tiny_cfg(), work, seed=0, progress=False)
    return work, stats


def _initial_adapter_state(cfg: RewardTrainConfig, seed: int) -> dict[str, torch.Tensor]:
    """The LoRA + score-head tensors exactly as `train_reward_model` initializes them."""
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import set_seed

    from training.common import lora_config
    from training.models import resolve_model
    from training.reward import _load_seqcls

    set_seed(seed)
    model = get_peft_model(_load_seqcls(resolve_model(cfg.base_model), torch.float32), lora_config(cfg, "SEQ_CLS"))
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_training_moves_loss_and_changes_every_lora_parameter(trained):
    work, stats = trained
    member = stats["members"][0]
    assert member["steps"] == 8 and len(member["losses"]) == 8
    assert member["losses"][-1] != pytest.approx(member["losses"][0], abs=1e-4)
    saved = load_file(work / "model" / "member-0" / "adapter_model.safetensors")
    init = _initial_adapter_state(tiny_cfg(), seed=0)
    assert set(saved) == set(init)
    assert any("score" in k for k in saved), "the score head must be saved with the adapter"
    assert sum("lora_A" in k for k in saved) == 2 * 7  # 2 layers × 7 projections
    unchanged = [k for k in saved if torch.allclose(saved[k].float(), init[k].float())]
    assert unchanged == []


def test_save_reload_gives_identical_scores(trained, hh_pairs):
    work, _ = trained
    pairs = hh_pairs[100:112]
    a = RewardModel.load(work / "model").score_pairs(pairs)
    b = RewardModel.load(work / "model").score_pairs(pairs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], a[1])  # real scores, not a constant


def test_scores_do_not_depend_on_batching(trained, hh_pairs):
    work, _ = trained
    rm = RewardModel.load(work / "model")
    items = [p.prompt + p.chosen for p in hh_pairs[:9]]
    together = rm.reward(items)
    one_by_one = np.array([rm.reward([x])[0] for x in items])
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)


def test_identical_texts_are_scored_once(trained, hh_pairs, monkeypatch):
    """A round's best-vs-rest pairs repeat each record's best answer: every distinct sequence goes through the
    model once, and each copy gets its score."""
    work, _ = trained
    rm = RewardModel.load(work / "model")
    pairs = [dataclasses.replace(hh_pairs[0], rejected=p.rejected) for p in hh_pairs[1:5]]  # one chosen, 4 times
    rows = []
    forward = rm.model.forward
    monkeypatch.setattr(rm.model, "forward", lambda *a, **kw: rows.append(len(kw["input_ids"])) or forward(*a, **kw))
    chosen, rejected = rm.score_pairs(pairs)
    assert sum(rows) == 1 + 4  # the shared chosen answer once, the four rejected ones
    assert len(set(chosen.tolist())) == 1 and len(set(rejected.tolist())) == 4
    alone = rm.reward([pairs[0].prompt + pairs[0].chosen])
    np.testing.assert_allclose(chosen, alone[0], atol=1e-4)


def test_killed_training_resumes_from_last_checkpoint(tmp_path, hh_pairs, tiny_model):
    train_reward_model(hh_pairs[:16], tiny_cfg(max_steps=2, save_steps=2), tmp_path, seed=0, progress=False)
    # simulate a kill after the checkpoint at step 2: the member's final adapter and stats were never written
    for name in ("adapter", "stats.json"):
        path = tmp_path / "member-0" / name
        path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    stats = train_reward_model(hh_pairs[:16], tiny_cfg(max_steps=4, save_steps=2), tmp_path, seed=0, progress=False)
    assert stats["members"][0]["resumed_from"] == "checkpoint-2"
    assert stats["members"][0]["steps"] == 4


def test_ensemble_members_differ_and_expose_disagreement(tmp_path, hh_pairs, tiny_model):
    train_reward_model(hh_pairs[:16], tiny_cfg(max_steps=3, ensemble=2), tmp_path, seed=0, progress=False)
    rm = RewardModel.load(tmp_path / "model")
    items = [p.prompt + p.chosen for p in hh_pairs[200:206]] + ["a plain text item"]
    per_member = rm.member_rewards(items)
    assert per_member.shape == (2, len(items))
    assert not np.allclose(per_member[0], per_member[1])
    np.testing.assert_allclose(rm.reward(items), per_member.mean(0), rtol=1e-5, atol=1e-7)  # adapters merged per call
    assert (rm.disagreement(items) > 0).all()
    from curation.acquisition.ensemble import prompt_reward_signals

    signals = prompt_reward_signals(per_member, np.array([0, 0, 0, 1, 1, 1, 1]), 2)
    assert (signals["reward_disagreement"] > 0).all()


def test_unknown_trl_argument_is_refused():
    from trl import RewardConfig

    with pytest.raises(CurateError, match="reward.trl.not_a_field"):
        trl_args(RewardConfig, {"output_dir": "x"}, {"not_a_field": 1}, "reward")
    assert trl_args(RewardConfig, {"output_dir": "x", "use_cpu": True, "bf16": False}, {"max_grad_norm": 0.5}, "reward").max_grad_norm == 0.5


def test_config_section_parses_and_rejects_unknown_keys():
    from preference.plumbing.config import ConfigError, from_dict

    cfg = from_dict(RewardTrainConfig, {"lora_r": 8, "replay": {"ratio": 0.5}, "trl": {"max_grad_norm": 1.0}})
    assert cfg.lora_r == 8 and cfg.replay.ratio == 0.5
    with pytest.raises(ConfigError, match="lora_rank"):
        from_dict(RewardTrainConfig, {"lora_rank": 8})
    with pytest.raises(ConfigError, match="max_length"):
        from_dict(RewardTrainConfig, {"max_length": 4})


# ------------------------------------------------------------------------------------------------------- data
def test_heldout_split_is_deterministic_and_prompt_disjoint(hh_pairs):
    train, held = split_heldout(hh_pairs, 50)
    train2, held2 = split_heldout(list(reversed(hh_pairs)), 50)
    assert [p.id for p in held] == [p.id for p in held2]  # file order does not matter
    assert {p.id for p in train} == {p.id for p in train2}
    assert len(held) == 50
    assert not {prompt_key(p.prompt) for p in held} & {prompt_key(p.prompt) for p in train}


def _pairs(n: int, round_no: int, tag: str) -> list[PreferencePair]:
    return [
        PreferencePair(id=f"{tag}-{i}", prompt_id=f"q{tag}{i}", prompt=[{"role": "user", "content": f"q{i}"}],
                       chosen=[{"role": "assistant", "content": "a"}], rejected=[{"role": "assistant", "content": "b"}],
                       round=round_no)
        for i in range(n)
    ]


def test_replay_mixing_counts_and_weights():
    new = _pairs(10, 3, "new")
    earlier = [(1, _pairs(40, 2, "r2")), (2, _pairs(40, 1, "r1"))]
    cfg = ReplayConfig(ratio=1.0, new_weight=2.0, weight=1.0, decay=0.5)
    mixed = mix_replay(new, earlier, cfg, np.random.default_rng(0), round_number=3)
    ids = [p.id for p in mixed.pairs]
    assert all(ids.count(p.id) == 2 for p in new)  # new data weighted 2×
    replayed = {i for i in ids if not i.startswith("new")}
    assert len(replayed) == 10  # ratio 1.0 → as many unique replay pairs as new ones
    from_r2 = {i for i in replayed if i.startswith("r2")}
    assert len(from_r2) == 7 and len(replayed - from_r2) == 3  # weights 1 : 0.5 split the budget 2 : 1
    assert mixed.counts["new"] == 20 and mixed.counts["total"] == len(ids)
    assert mixed.counts["replay"] == len(ids) - 20
    assert set(mixed.lineage) == {"round-3", "round-2", "round-1"}
    # no replay
    none = mix_replay(new, earlier, ReplayConfig(ratio=0.0, new_weight=1.0), np.random.default_rng(0))
    assert sorted(p.id for p in none.pairs) == sorted(p.id for p in new)
    # deterministic given the seed
    again = mix_replay(new, earlier, cfg, np.random.default_rng(0), round_number=3)
    assert [p.id for p in again.pairs] == ids


def test_pretruncation_keeps_prompt_end_and_answer_start(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = [{"role": "user", "content": "early words " * 200 + "LAST QUESTION"}]
    answer = "first answer words " + "filler " * 300
    ids = encode_pair(tok, prompt, answer, 96)
    assert len(ids) == 96
    text = tok.decode(ids)
    assert "LAST QUESTION" in text and "first answer words" in text
    assert "early words" * 100 not in text
    short = encode_pair(tok, [{"role": "user", "content": "hi"}], "ok", 96)
    assert tok.decode(short).endswith("ok<|im_end|>\n")


def test_scoring_with_the_adapter_merged_equals_unmerged(trained, hh_pairs, monkeypatch):
    import contextlib

    import training.reward as reward_module

    work, _ = trained
    rm = RewardModel.load(work / "model")
    items = [p.prompt + p.chosen for p in hh_pairs[120:126]]
    merged = rm.reward(items)
    assert not any(getattr(m, "merged", False) for m in rm.model.modules())  # unmerged after the call
    monkeypatch.setattr(reward_module, "merged_adapter", lambda model, enabled=True: contextlib.nullcontext())
    np.testing.assert_allclose(rm.reward(items), merged, rtol=1e-5, atol=1e-6)


def test_training_batches_group_pairs_of_similar_length(tmp_path, hh_pairs, tiny_model):
    """The real trainer's batches (its dataloader, as `fit` consumes it): every pair once per epoch, and far less
    padding than plain shuffling (`trl: {train_sampling_strategy: random}`, which users can still choose)."""
    from training.common import load_tokenizer
    from training.models import resolve_model
    from training.reward import reward_trainer, tokenize_pairs

    base = resolve_model("tiny-llama")
    tokenizer = load_tokenizer(base)
    cols = tokenize_pairs(tokenizer, hh_pairs[:64], 512, use_margin=False)  # lengths vary below 512
    assert cols["length"] == [max(len(c), len(r)) for c, r in zip(cols["chosen_ids"], cols["rejected_ids"], strict=True)]

    def batches(cfg):
        trainer = reward_trainer(base, tokenizer, cols, cfg, tmp_path / "member-0", seed=0, progress=False)
        out = list(trainer.get_train_dataloader())
        seen = sorted(tuple(row[mask.bool()].tolist()) for b in out
                      for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True))
        padding = sum(int((b["attention_mask"] == 0).sum()) for b in out) / sum(b["attention_mask"].numel() for b in out)
        return seen, padding

    grouped_seen, grouped = batches(tiny_cfg())
    random_seen, shuffled = batches(tiny_cfg(trl={"train_sampling_strategy": "random"}))
    expected = sorted(tuple(ids) for ids in cols["chosen_ids"] + cols["rejected_ids"])
    assert grouped_seen == random_seen == expected
    assert grouped < 0.6 * shuffled, (grouped, shuffled)  # measured: 20 % vs 37 % (a pair's two sides still differ)
