"""`curate generate`: completions, references, policies, resume and cache (dummy backend unless stated)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from curation import backends as B
from curation.config import RoundConfig
from curation.steps.generate import GenerationConfig, prepare_prompt, run_generate
from curation.steps.pool import PoolConfig, PoolSource, run_pool
from preference.plumbing.config import ConfigError, from_dict, load_yaml
from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_jsonl, read_rows, write_rows
from preference.plumbing.store import Project
from preference.schema import Completion, Prompt


def make_round(tmp_path: Path, hh_sample: Path, limit: int = 10, **gen) -> tuple[RoundConfig, object]:
    gen = {"backend": B.BackendSettings(name="dummy"), "models": ["dummy-a"], "n": 3, "max_tokens": 16,
           "batch_size": 4, "cache_dir": tmp_path / "cache", **gen}
    cfg = RoundConfig(
        project=tmp_path / "proj",
        pool=PoolConfig(sources=[PoolSource(path=hh_sample, format="hh", slice="harmless", limit=limit)]),
        generation=GenerationConfig(**gen),
    )
    rnd = Project(cfg.project).round(1, create=True)
    run_pool(cfg, rnd, progress=False)
    return cfg, rnd


def completions(rnd) -> list[dict]:
    return read_rows(rnd.step("generate").file("completions.parquet"))


def test_generate_writes_completions_with_references(tmp_path, hh_sample):
    cfg, rnd = make_round(tmp_path, hh_sample, models=["dummy-a", "dummy-b"], include_references=True)
    manifest = run_generate(cfg, rnd, progress=False)
    rows = completions(rnd)
    assert manifest["counts"]["completions"] == len(rows) == 10 * (2 * 3 + 2)
    assert len({r["id"] for r in rows}) == len(rows)
    by_model = {m: [r for r in rows if r["model"] == m] for m in ("dummy-a", "dummy-b", "reference:chosen")}
    assert len(by_model["dummy-a"]) == len(by_model["dummy-b"]) == 30 and len(by_model["reference:chosen"]) == 10
    prompts = {r["id"]: Prompt.from_row(r) for r in read_rows(rnd.step("pool").file("prompts.parquet"))}
    for r in rows:
        c = Completion.from_row(r)
        assert c.finish_reason in ("stop", "length", "reference") and c.num_tokens > 0 and c.mean_logprob < 0
        if c.model == "reference:chosen":
            assert c.text == prompts[c.prompt_id].metadata["reference_chosen"]
    # a finished step with the same config is skipped
    assert run_generate(cfg, rnd, progress=False)["finished_at"] == manifest["finished_at"]


def test_generate_on_transformers_tiny_model(tmp_path, hh_sample, tiny_model):
    cfg, rnd = make_round(tmp_path, hh_sample, limit=3, backend=B.BackendSettings(name="transformers", dtype="float32"),
                          models=[str(tiny_model)], n=2, max_tokens=8)
    run_generate(cfg, rnd, progress=False)
    rows = completions(rnd)
    assert len(rows) == 6 and all(r["num_tokens"] == 8 and r["finish_reason"] == "length" for r in rows)
    assert all(r["entropy"] > 0 and r["mean_logprob"] < 0 for r in rows)


@pytest.mark.parametrize("key,value", [("n", 0), ("temperature", -1), ("top_p", 2.0), ("max_tokens", 0)])
def test_bad_sampling_params_fail_naming_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"generation\.{key}"):
        from_dict(GenerationConfig, {key: value}, "generation")
    path = tmp_path / "bad.yaml"
    path.write_text(f"generation:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"bad.yaml: .*generation\.{key} = {value!r}"):
        load_yaml(path, RoundConfig)
    with pytest.raises(CurateError, match=rf"generation\.{key}"):
        GenerationConfig(**{key: value})


def test_resume_after_a_crash_reuses_finished_shards(tmp_path, hh_sample, monkeypatch):
    cfg, rnd = make_round(tmp_path, hh_sample, cache=False)  # 10 prompts, 3 shards of ≤ 4
    calls = []
    real = B.DummyBackend._generate

    def crash_on_third(self, prompts, sampling):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise RuntimeError("simulated kill at 80%")
        return real(self, prompts, sampling)

    monkeypatch.setattr(B.DummyBackend, "_generate", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_generate(cfg, rnd, progress=False)
    assert not rnd.step("generate").done
    assert len(list(rnd.step("generate").parts_dir.glob("gen-*.parquet"))) == 2

    calls.clear()
    monkeypatch.setattr(B.DummyBackend, "_generate", lambda self, p, s: calls.append(len(p)) or real(self, p, s))
    manifest = run_generate(cfg, rnd, progress=False)
    assert calls == [2]  # only the last shard (2 prompts) was generated again
    assert manifest["counts"]["shards_reused"] == 2
    rows = completions(rnd)
    assert len(rows) == len({r["id"] for r in rows}) == 30

    # identical to an uninterrupted run
    cfg2, rnd2 = make_round(tmp_path / "clean", hh_sample, cache=False)
    run_generate(cfg2, rnd2, progress=False)
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(completions(rnd2), key=key) == sorted(rows, key=key)


def test_cache_hits_across_runs(tmp_path, hh_sample, monkeypatch):
    cfg, rnd = make_round(tmp_path / "a", hh_sample, cache_dir=tmp_path / "cache")
    first = run_generate(cfg, rnd, progress=False)["counts"]
    assert (first["cache_hits"], first["cache_misses"]) == (0, 10)

    def boom(self, prompts, sampling):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(B.DummyBackend, "_generate", boom)
    cfg_b, rnd_b = make_round(tmp_path / "b", hh_sample, cache_dir=tmp_path / "cache")
    second = run_generate(cfg_b, rnd_b, progress=False)["counts"]
    assert (second["cache_hits"], second["cache_misses"]) == (10, 0)
    assert completions(rnd_b) == completions(rnd)

    monkeypatch.undo()
    cfg_c, rnd_c = make_round(tmp_path / "c", hh_sample, cache_dir=tmp_path / "cache", seed=1)
    third = run_generate(cfg_c, rnd_c, progress=False)["counts"]
    assert third["cache_misses"] == 10  # another seed is another request


def _pool_with(tmp_path, prompts: list[Prompt], engine: dict | None = None, **gen):
    engine = engine or {}
    cfg = RoundConfig(project=tmp_path / "proj", generation=GenerationConfig(
        backend=B.BackendSettings(name="dummy", **engine), models=["dummy-a"], n=2, cache=False, **gen))
    rnd = Project(cfg.project).round(1, create=True)
    with rnd.start_step("pool", {"manual": True}) as run:
        write_rows(run.path / "prompts.parquet", [p.to_row() for p in prompts])
    return cfg, rnd


def test_empty_prompts_are_rejected_and_reported(tmp_path):
    ok = Prompt(id="ok", messages=[{"role": "user", "content": "How do I make tea?"}])
    empty = Prompt(id="empty", messages=[{"role": "user", "content": "   \n "}])
    cfg, rnd = _pool_with(tmp_path, [ok, empty], max_tokens=8)
    manifest = run_generate(cfg, rnd, progress=False)
    assert manifest["counts"]["rejected_empty"] == 1
    assert {r["prompt_id"] for r in completions(rnd)} == {"ok"}
    assert read_jsonl(rnd.step("generate").file("rejected.jsonl")) == [
        {"prompt_id": "empty", "model": "dummy-a", "reason": "empty"}
    ]


@pytest.mark.parametrize("policy", ["reject", "truncate"])
def test_prompts_longer_than_the_context(tmp_path, policy):
    short = Prompt(id="short", messages=[{"role": "user", "content": "Hi there"}])
    long = Prompt(id="long", messages=[{"role": "user", "content": " ".join(f"w{i}" for i in range(100))}])
    cfg, rnd = _pool_with(tmp_path, [short, long], max_tokens=8, engine={"max_model_len": 40}, prompt_too_long=policy)
    counts = run_generate(cfg, rnd, progress=False)["counts"]
    got = {r["prompt_id"] for r in completions(rnd)}
    if policy == "reject":
        assert got == {"short"} and counts["rejected_too_long"] == 1 and counts["truncated"] == 0
    else:
        assert got == {"short", "long"} and counts["truncated"] == 1 and counts["rejected_too_long"] == 0
        backend = B.DummyBackend(settings=B.BackendSettings(max_model_len=40))
        ids, reason = prepare_prompt(backend, long, cfg.generation)
        full = backend.encode(backend.render_chat(long.messages))
        assert reason == "truncated" and ids == full[-32:]  # the end (and the assistant opener) is kept


def test_max_tokens_must_leave_room_for_the_prompt():
    with pytest.raises(ConfigError, match=r"generation: max_model_len \(64\) must be larger than max_tokens"):
        from_dict(GenerationConfig, {"max_tokens": 64, "backend": {"max_model_len": 64}}, "generation")


def test_manifest_records_hardware_generators_and_timings(tmp_path, hh_sample, capsys):
    cfg, rnd = make_round(tmp_path, hh_sample, limit=4, include_references=True)
    manifest = run_generate(cfg, rnd, progress=False)
    hw = manifest["hardware"]
    assert hw["dtype"] in ("float32", "bfloat16") and hw["threads"] >= 1 and "features" in hw
    backend = B.DummyBackend("dummy-a", cfg.generation.backend)
    info = {"backend": "dummy", "fingerprint": backend.fingerprint(), "dtype": backend.dtype,
            "max_model_len": backend.max_model_len}
    assert manifest["generators"] == {"dummy-a": info, "reference:chosen": info, "reference:rejected": info}
    assert set(manifest["timings"]["dummy-a"]) == {"generate", "loglikelihood"}
    out = capsys.readouterr().out
    assert out.count(f"generate: dummy backend on {hw['cpu']}") == 1 and f"{hw['threads']} threads" in out


def test_outputs_of_different_dtypes_never_mix(tmp_path, hh_sample):
    """Same prompts, same cache folder, another precision: nothing is taken from the cache or the parts."""
    fp32 = B.BackendSettings(name="dummy", dtype="float32")
    cfg, rnd = make_round(tmp_path / "a", hh_sample, backend=fp32, cache_dir=tmp_path / "cache")
    assert run_generate(cfg, rnd, progress=False)["counts"]["cache_misses"] == 10
    bf16 = B.BackendSettings(name="dummy", dtype="bfloat16")
    cfg_b, rnd_b = make_round(tmp_path / "b", hh_sample, backend=bf16, cache_dir=tmp_path / "cache")
    counts = run_generate(cfg_b, rnd_b, progress=False)["counts"]
    assert (counts["cache_hits"], counts["cache_misses"]) == (0, 10)
    assert rnd_b.step("generate").manifest()["hardware"]["dtype"] == "bfloat16"
    # the same round redone in bf16 names its resumable parts differently: fp32 parts are never reused
    parts = rnd.step("generate").parts_dir
    before = {p.name for p in parts.glob("gen-*.parquet")}
    cfg_c = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, backend=bf16))
    run_generate(cfg_c, rnd, progress=False, force=True)
    after = {p.name for p in parts.glob("gen-*.parquet")}
    assert len(before) == len(after) == 3 and before.isdisjoint(after)
