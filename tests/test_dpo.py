"""DPO/LoRA on the tiny model: the loss moves, every LoRA parameter trains, the reference is the base model,
save → reload is exact, pre-truncation keeps every pair."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.data import answer_text, load_hh_pairs
from training.dpo import DPOTrainConfig, dpo_rows, train_dpo
from training.policy import Policy


@pytest.fixture(scope="module")
def hh_pairs(hh_sample):
    return load_hh_pairs(hh_sample)


def tiny_cfg(**kw) -> DPOTrainConfig:
    base = dict(base_model="tiny-llama", max_steps=6, batch_size=2, grad_accum=1, learning_rate=5e-3,
                warmup_ratio=0.0, max_prompt_length=48, max_completion_length=24, threads=1, save_steps=3,
                logging_steps=1, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    base.update(kw)
    return DPOTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hh_pairs, tiny_model):
    work = tmp_path_factory.mktemp("dpo")
    stats = train_dpo(hh_pairs[:12], tiny_cfg(), work, seed=0, progress=False)
    return work, stats


def test_dpo_loss_moves_and_every_lora_parameter_changes(trained):
    work, stats = trained
    assert stats["steps"] == 6 and len(stats["losses"]) == 6
    assert stats["losses"][-1] != pytest.approx(stats["losses"][0], abs=1e-4)
    saved = load_file(work / "model" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7
    assert all(v.abs().sum() > 0 for v in lora_b.values())  # LoRA B starts at zero: nonzero means it trained
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, set_seed

    from training.common import lora_config
    from training.models import resolve_model

    set_seed(0)
    init_model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama")),
                                lora_config(tiny_cfg(), "CAUSAL_LM"))
    init = get_peft_model_state_dict(init_model)
    assert set(init) == set(saved)
    assert [k for k in saved if torch.allclose(saved[k], init[k])] == []


def test_reference_is_the_base_and_reload_is_exact(trained, hh_pairs, tiny_model):
    work, _ = trained
    pairs = hh_pairs[300:304]
    prompts, answers = [p.prompt for p in pairs], [answer_text(p.chosen) for p in pairs]
    a = Policy.load(work / "model")
    b = Policy.load(work / "model")
    tuned, n = a.logps(prompts, answers)
    np.testing.assert_array_equal(tuned, b.logps(prompts, answers)[0])
    with a.reference():
        ref = a.logps(prompts, answers)[0]
    base = Policy.load(tiny_model).logps(prompts, answers)[0]
    np.testing.assert_allclose(ref, base, rtol=1e-5)
    assert not np.allclose(tuned, ref)
    assert (n > 0).all()


def test_pretruncation_keeps_every_pair(hh_pairs, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = tiny_cfg(max_prompt_length=40, max_completion_length=16)
    long = dataclasses.replace(hh_pairs[0], prompt=hh_pairs[0].prompt + [
        {"role": "assistant", "content": "x " * 300}, {"role": "user", "content": "final question"}])
    rows = dpo_rows(tok, [long] + hh_pairs[1:5], cfg)
    assert len(rows["prompt"]) == 5
    for prompt, chosen in zip(rows["prompt"], rows["chosen"], strict=True):
        assert prompt[-1]["role"] == "user"
        n_prompt = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
        assert n_prompt <= 40
        assert len(tok(chosen[0]["content"], add_special_tokens=False)["input_ids"]) <= 16
    assert rows["prompt"][0][-1]["content"].endswith("final question")


def test_config_parses_and_maps_to_trl(tmp_path):
    from preference.plumbing.config import ConfigError, from_dict

    cfg = from_dict(DPOTrainConfig, {"beta": 0.2, "loss_type": ["sigmoid", "sft"], "trl": {"max_grad_norm": 0.3}})
    assert cfg.beta == 0.2 and cfg.loss_type == ["sigmoid", "sft"]
    with pytest.raises(ConfigError, match="betta"):
        from_dict(DPOTrainConfig, {"betta": 0.2})


def test_batched_logps_and_generation_equal_one_at_a_time(trained, hh_pairs):
    work, _ = trained
    pairs = hh_pairs[200:211]  # 11: batches of 4 with a ragged last one, different lengths (left padding)
    prompts, answers = [p.prompt for p in pairs], [answer_text(p.rejected) for p in pairs]
    policy = Policy.load(work / "model", batch_size=4)
    batched, n = policy.logps(prompts, answers)
    policy.batch_size = 1
    single, n1 = policy.logps(prompts, answers)
    np.testing.assert_allclose(batched, single, rtol=1e-6, atol=1e-4)
    assert (n == n1).all() and len(set(n)) > 1
    with policy.reference():
        ref_single = policy.logps(prompts, answers)[0]
        policy.batch_size = 4
        np.testing.assert_allclose(policy.logps(prompts, answers)[0], ref_single, rtol=1e-6, atol=1e-4)
    # generation: a tiny random model only repeats one token; perturb it so answers differ between prompts
    torch.manual_seed(0)
    with torch.no_grad():
        for param in policy.model.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    together = policy.generate(prompts[:6], max_new_tokens=8)
    policy.batch_size = 1
    assert policy.generate(prompts[:6], max_new_tokens=8) == together
    assert len(set(together)) > 1


def test_previous_policy_adapter_shares_the_loaded_base(trained, tmp_path, hh_pairs, tiny_model):
    work, _ = trained
    other = tmp_path / "other"
    train_dpo(hh_pairs[40:46], tiny_cfg(max_steps=2, learning_rate=2e-2), other, seed=1, progress=False)
    prompts, answers = [p.prompt for p in hh_pairs[300:304]], [answer_text(p.chosen) for p in hh_pairs[300:304]]
    policy = Policy.load(work / "model")
    mine = policy.logps(prompts, answers)[0]
    assert policy.add_adapter(other / "model", "previous")
    with policy.adapter("previous"):
        shared = policy.logps(prompts, answers)[0]
    np.testing.assert_allclose(shared, Policy.load(other / "model").logps(prompts, answers)[0], rtol=1e-6)
    np.testing.assert_allclose(policy.logps(prompts, answers)[0], mine, rtol=1e-6)  # back to its own adapter
    assert not policy.add_adapter(tiny_model, "base")  # a plain model is not an adapter: load it on its own


def test_adapter_is_merged_for_inference_and_unmerged_after(trained, hh_pairs, monkeypatch):
    """Log-probs and greedy answers run with the LoRA adapter merged into the base weights (not inside
    `reference()`), give what the unmerged adapter gives, and leave no layer merged."""
    import contextlib

    import training.policy as policy_module

    work, _ = trained
    policy = Policy.load(work / "model")
    prompts, answers = [p.prompt for p in hh_pairs[300:304]], [answer_text(p.chosen) for p in hh_pairs[300:304]]
    lora = [m for m in policy.model.modules() if hasattr(m, "lora_A") and hasattr(m, "merged")]
    seen: list[bool] = []
    hook = lora[0].register_forward_hook(lambda module, args, out: seen.append(module.merged))
    merged = policy.logps(prompts, answers)[0]
    with policy.reference():
        reference = policy.logps(prompts, answers)[0]
    greedy = policy.generate(prompts, max_new_tokens=6)
    hook.remove()
    # one batch with the adapter (merged), one as the reference (not merged), then the decoding steps (merged)
    assert seen[:2] == [True, False] and len(seen) > 2 and all(seen[2:])
    assert not any(m.merged for m in lora)
    monkeypatch.setattr(policy_module, "merged_adapter", lambda model, enabled=True: contextlib.nullcontext())
    np.testing.assert_allclose(policy.logps(prompts, answers)[0], merged, rtol=1e-5)
    with policy.reference():
        np.testing.assert_allclose(policy.logps(prompts, answers)[0], reference, rtol=1e-5)
    assert policy.generate(prompts, max_new_tokens=6) == greedy
    assert not np.allclose(merged, reference)  # the adapter matters: the comparison can fail
