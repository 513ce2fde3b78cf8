"""Model registry and promotion gate: decisions on constructed metrics, crash-safe registration, rollback."""

from __future__ import annotations

import shutil

import pytest

from preference.plumbing.errors import CurateError
from training.registry import GateConfig, Registry, decide, format_versions, list_versions, promote, rollback


def metrics(acc: float, slices: dict[str, tuple[float, int]] | None = None) -> dict:
    return {"reward": {"accuracy": acc, "slices": {k: {"accuracy": a, "n": n} for k, (a, n) in (slices or {}).items()}}}


def test_gate_promotes_first_version_above_floor_only():
    cfg = GateConfig(min_value=0.55)
    assert decide(metrics(0.6), None, cfg).promote
    refused = decide(metrics(0.52), None, cfg)
    assert not refused.promote and "min_value" in refused.reasons[0]


def test_gate_requires_the_configured_margin():
    cfg = GateConfig(min_improvement=0.02)
    assert decide(metrics(0.65), metrics(0.62), cfg).promote
    d = decide(metrics(0.63), metrics(0.62), cfg)
    assert not d.promote
    assert d.comparisons["reward.accuracy"]["delta"] == pytest.approx(0.01)
    assert not decide(metrics(0.60), metrics(0.62), GateConfig()).promote  # worse is never promoted


def test_gate_refuses_a_slice_regression_beyond_tolerance():
    cfg = GateConfig(min_improvement=0.0, slice_tolerance=0.05, min_slice_size=20)
    champion = metrics(0.60, {"harm_flagged:yes": (0.70, 50), "length:long": (0.70, 10)})
    ok = metrics(0.65, {"harm_flagged:yes": (0.66, 50), "length:long": (0.30, 10)})  # small slice ignored
    assert decide(ok, champion, cfg).promote
    bad = metrics(0.65, {"harm_flagged:yes": (0.60, 50)})
    d = decide(bad, champion, cfg)
    assert not d.promote and any("harm_flagged:yes" in r for r in d.reasons)


def test_gate_unknown_metric_is_a_clear_error():
    with pytest.raises(CurateError, match="dpo.win_rate"):
        decide(metrics(0.6), None, GateConfig(metrics=["dpo.win_rate"]))


def _model(tmp_path, name: str):
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights-" + name.encode())
    return folder


def _register(reg: Registry, tmp_path, name: str, acc: float, round_no: int) -> str:
    return reg.register({"reward": _model(tmp_path, name)}, metrics=metrics(acc), lineage={"round-1": ["p1"]},
                        config={"lr": 1e-4}, round=round_no)


def test_register_gate_promote_rollback(tmp_path):
    reg = Registry(tmp_path / "registry")
    v1 = _register(reg, tmp_path, "a", 0.60, 1)
    assert reg.gate_and_promote(v1, GateConfig()).promote and reg.champion() == v1
    v2 = _register(reg, tmp_path, "b", 0.58, 2)
    assert not reg.gate_and_promote(v2, GateConfig()).promote and reg.champion() == v1
    v3 = _register(reg, tmp_path, "c", 0.66, 3)
    assert reg.gate_and_promote(v3, GateConfig()).promote and reg.champion() == v3
    assert (reg.path(v3) / "reward" / "adapter_model.safetensors").read_bytes() == b"weights-c"
    assert reg.metrics(v3)["reward"]["accuracy"] == 0.66
    assert [v["id"] for v in list_versions(reg.root)] == [v1, v2, v3]
    assert [v["champion"] for v in list_versions(reg.root)] == [False, False, True]
    assert "v0003" in format_versions(reg.root) and "0.6600" in format_versions(reg.root)
    assert rollback(reg.root) == v1 and reg.champion() == v1
    promote(reg.root, v2)  # manual promotion, no gate
    assert reg.champion() == v2
    assert [h["action"] for h in reg.history()] == [
        "register", "promote", "register", "refuse", "register", "promote", "rollback", "promote"]
    rollback(reg.root)
    rollback(reg.root)
    assert reg.champion() is None
    with pytest.raises(CurateError, match="no champion"):
        rollback(reg.root)
    with pytest.raises(CurateError, match="v0009"):
        reg.get("v0009")


def test_crash_during_save_leaves_index_unchanged_and_no_half_version(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "registry")
    v1 = _register(reg, tmp_path, "a", 0.60, 1)
    before = reg.index_path.read_bytes()
    real_copytree = shutil.copytree
    calls = {"n": 0}

    def crash_midway(src, dst, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the first model folder is copied, the crash hits the second
            raise OSError("disk full (simulated)")
        return real_copytree(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "copytree", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        reg.register({"reward": _model(tmp_path, "b"), "policy": _model(tmp_path, "c")}, metrics=metrics(0.7),
                     lineage={}, config={}, round=2)
    monkeypatch.setattr(shutil, "copytree", real_copytree)
    assert reg.index_path.read_bytes() == before
    assert sorted(p.name for p in reg.root.iterdir()) == ["index.json", v1]
    # a hard kill leaves a temp folder behind: the next registration removes it and numbering continues
    (reg.root / ".tmp-v0002-999").mkdir()
    v2 = _register(reg, tmp_path, "d", 0.7, 2)
    assert v2 == "v0002" and not list(reg.root.glob(".tmp-*"))


def test_orphan_version_folder_is_not_listed_nor_reused(tmp_path):
    reg = Registry(tmp_path / "registry")
    v1 = _register(reg, tmp_path, "a", 0.60, 1)
    (reg.root / "v0002").mkdir()  # renamed into place, then killed before the index write
    assert [v["id"] for v in reg.versions()] == [v1]
    assert _register(reg, tmp_path, "b", 0.61, 2) == "v0003"


def test_champion_policy_is_dpo_else_kto(tmp_path):
    """One rule for "the champion's policy" (serving, evaluation): the trainer table's first policy present."""
    reg = Registry(tmp_path / "registry")
    assert reg.champion_policy() is None and reg.champion_reward_model() is None
    both = reg.register({"reward": _model(tmp_path, "r1"), "policy_kto": _model(tmp_path, "k1"),
                         "policy": _model(tmp_path, "d1")}, metrics=metrics(0.6), lineage={}, config={}, round=1)
    promote(reg.root, both)
    assert reg.champion_policy() == reg.path(both) / "policy"
    assert reg.champion_reward_model() == reg.path(both) / "reward"
    kto_only = reg.register({"reward": _model(tmp_path, "r2"), "policy_kto": _model(tmp_path, "k2")},
                            metrics=metrics(0.7), lineage={}, config={}, round=2)
    promote(reg.root, kto_only)
    assert reg.champion_policy() == reg.path(kto_only) / "policy_kto"
    none = reg.register({"reward": _model(tmp_path, "r3")}, metrics=metrics(0.8), lineage={}, config={}, round=3)
    promote(reg.root, none)
    assert reg.champion_policy() is None
