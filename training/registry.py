"""Local model registry and the promotion gate.

    <registry>/
      index.json                  versions, the champion stack and the action history (written atomically)
      v0001/                      one folder per registered version (renamed into place when complete)
        reward/  policy/  ...     the models (LoRA adapters + model cards): one folder per trained kind, named by
                                  its `artifact` in the trainer table (training/trainers.py)
        version.json              id, round, created_at, files
        metrics.json lineage.json config.json

A version is registered by copying into `.tmp-<id>-<pid>/` and renaming the folder into place; only then is
the index updated. A crash at any point leaves the index unchanged and no half-written version (an orphaned
temp folder is removed by the next `register`; a complete folder not yet in the index is never listed and its
id is not reused).

The gate (`decide`) promotes a candidate only when, on every gate metric (dotted paths into the evaluation
metrics, higher = better), it beats the champion by more than `min_improvement`, reaches `min_value`, and no
slice of that metric (`<section>.slices.<slice>.<metric>`) with at least `min_slice_size` pairs drops by more
than `slice_tolerance`. With no champion yet, the candidate is promoted when it reaches `min_value`.
`rollback` restores the previous champion. `champion_policy()` is the one rule for "the champion's policy"
(serving, and the policy evaluation must beat): the first policy of the trainer table (DPO, then KTO) that the
champion version holds.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_json, write_json
from training.trainers import Role, with_role


@dataclass
class GateConfig:
    """`gate:` section."""

    metrics: list[str] = field(default_factory=lambda: ["reward.accuracy"])  # dotted paths; higher = better
    min_improvement: float = 0.0  # candidate − champion must exceed this on every gate metric
    min_value: float = 0.5  # floor on every gate metric (0.5 = better than chance for accuracies)
    slice_tolerance: float = 0.05  # max drop of any slice of a gate metric vs the champion
    min_slice_size: int = 20  # smaller slices are too noisy to veto a promotion
    registry: Path | None = None  # default: <project>/registry
    max_failures: int | None = None  # cap on failures sent back to the pool (largest errors first); null = all

    def __post_init__(self):
        if not self.metrics:
            raise ValueError("gate.metrics must name at least one metric, e.g. reward.accuracy")
        if self.slice_tolerance < 0 or self.min_slice_size < 1:
            raise ValueError("slice_tolerance must be ≥ 0 and min_slice_size ≥ 1")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------- gate
def lookup(metrics: dict[str, Any], path: str) -> Any:
    """`metrics["a"]["b"]` for path `a.b`; None when any part is missing."""
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass
class Decision:
    promote: bool
    reasons: list[str]  # why not (or "first version" / what improved)
    comparisons: dict[str, dict[str, Any]]  # metric or slice → candidate, champion, delta

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reasons": self.reasons, "comparisons": self.comparisons}


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None, cfg: GateConfig) -> Decision:
    """Gate a candidate's metrics against the champion's (both evaluated on the same held-out set)."""
    reasons: list[str] = []
    comparisons: dict[str, dict[str, Any]] = {}
    ok = True
    for path in cfg.metrics:
        value = lookup(candidate, path)
        if not isinstance(value, (int, float)):
            raise CurateError(
                f"gate metric {path!r} is not in the candidate's metrics; set gate.metrics to dotted paths such as "
                "reward.accuracy or dpo.implicit_accuracy (see the evaluate step's metrics.json)"
            )
        if value < cfg.min_value:
            ok = False
            reasons.append(f"{path} = {value:.4f} is below min_value {cfg.min_value}")
        if champion is None:
            comparisons[path] = {"candidate": value, "champion": None, "delta": None}
            continue
        best = lookup(champion, path)
        if not isinstance(best, (int, float)):
            comparisons[path] = {"candidate": value, "champion": None, "delta": None}
            reasons.append(f"{path}: the champion has no value; compared on min_value only")
            continue
        delta = value - best
        comparisons[path] = {"candidate": value, "champion": best, "delta": delta}
        if delta <= cfg.min_improvement:
            ok = False
            reasons.append(f"{path} = {value:.4f} vs champion {best:.4f}: improvement {delta:+.4f} "
                           f"is not above min_improvement {cfg.min_improvement}")
        section, _, name = path.rpartition(".")
        cand_slices = lookup(candidate, f"{section}.slices" if section else "slices") or {}
        champ_slices = lookup(champion, f"{section}.slices" if section else "slices") or {}
        for slice_name, cand in sorted(cand_slices.items()):
            champ = champ_slices.get(slice_name)
            if not isinstance(champ, dict) or name not in cand or name not in champ:
                continue
            if min(cand.get("n", 0), champ.get("n", 0)) < cfg.min_slice_size:
                continue
            drop = champ[name] - cand[name]
            comparisons[f"{path}[{slice_name}]"] = {"candidate": cand[name], "champion": champ[name], "delta": -drop}
            if drop > cfg.slice_tolerance:
                ok = False
                reasons.append(f"slice {slice_name}: {name} drops {drop:.4f} (> slice_tolerance {cfg.slice_tolerance})")
    if ok:
        reasons.insert(0, "no champion yet" if champion is None else "beats the champion on every gate metric")
    return Decision(ok, reasons, comparisons)


# ------------------------------------------------------------------------------------------------- registry
class Registry:
    """A folder of model versions with an index (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CurateError(f"registry path {self.root} is a file; expected a folder")
        self.index_path = self.root / "index.json"

    def _index(self) -> dict[str, Any]:
        if not self.index_path.is_file():
            return {"versions": [], "champions": [], "history": []}
        return read_json(self.index_path)

    def _write_index(self, index: dict[str, Any]) -> None:
        write_json(self.index_path, index)

    # reading ------------------------------------------------------------------------------------------------
    def versions(self) -> list[dict[str, Any]]:
        index = self._index()
        champion = index["champions"][-1] if index["champions"] else None
        return [{**v, "champion": v["id"] == champion} for v in index["versions"]]

    def get(self, version: str) -> dict[str, Any]:
        for v in self._index()["versions"]:
            if v["id"] == version:
                return v
        have = ", ".join(v["id"] for v in self._index()["versions"]) or "none"
        raise CurateError(f"model version {version!r} is not in the registry {self.root} (versions: {have})")

    def path(self, version: str) -> Path:
        self.get(version)
        return self.root / version

    def champion(self) -> str | None:
        champions = self._index()["champions"]
        return champions[-1] if champions else None

    def metrics(self, version: str) -> dict[str, Any]:
        return read_json(self.path(version) / "metrics.json")

    def config(self, version: str) -> dict[str, Any]:
        """The round config the version was trained and evaluated with (as registered)."""
        return read_json(self.path(version) / "config.json")

    def artifact(self, version: str | None, role: Role) -> Path | None:
        """The model folder of `version` for `role`: the first trainer of that role in the trainer table whose
        artifact the version holds (None when it holds none, or when `version` is None)."""
        if version is None:
            return None
        root = self.path(version)
        return next((root / t.artifact for t in with_role(role) if (root / t.artifact).is_dir()), None)

    def champion_policy(self) -> Path | None:
        """The champion's policy adapter folder (DPO's if it has one, else KTO's: trainer-table order); None when
        there is no champion or it holds no policy."""
        return self.artifact(self.champion(), "policy")

    def champion_reward_model(self) -> Path | None:
        """The champion's reward model folder; None when there is no champion or it holds no reward model."""
        return self.artifact(self.champion(), "reward_model")

    def history(self) -> list[dict[str, Any]]:
        return self._index()["history"]

    # writing ------------------------------------------------------------------------------------------------
    def _next_id(self, index: dict[str, Any]) -> str:
        used = [int(v["id"][1:]) for v in index["versions"]]
        used += [int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.name[1:].isdigit()]
        return f"v{max(used, default=0) + 1:04d}"

    def register(
        self,
        files: dict[str, Path],
        *,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        config: dict[str, Any],
        round: int | None = None,
        note: str = "",
    ) -> str:
        """Copy `files` (name → file or folder) into a new version; return its id. Crash-safe (see module doc)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        index = self._index()
        version = self._next_id(index)
        tmp = self.root / f".tmp-{version}-{os.getpid()}"
        try:
            tmp.mkdir()
            for name, src in files.items():
                src = Path(src)
                if src.is_dir():
                    shutil.copytree(src, tmp / name)
                elif src.is_file():
                    shutil.copy2(src, tmp / name)
                else:
                    raise CurateError(f"cannot register {name!r}: {src} does not exist")
            entry = {"id": version, "round": round, "created_at": _now(), "files": sorted(files), "note": note}
            write_json(tmp / "metrics.json", metrics)
            write_json(tmp / "lineage.json", lineage)
            write_json(tmp / "config.json", config)
            write_json(tmp / "version.json", entry)
            os.rename(tmp, self.root / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        index["versions"].append(entry)
        index["history"].append({"action": "register", "version": version, "at": entry["created_at"]})
        self._write_index(index)
        return version

    def promote(self, version: str, *, reason: str = "manual") -> None:
        """Make `version` the champion (no gate: `gate_and_promote` applies the gate)."""
        self.get(version)
        index = self._index()
        if index["champions"] and index["champions"][-1] == version:
            return
        index["champions"].append(version)
        index["history"].append({"action": "promote", "version": version, "at": _now(), "reason": reason})
        self._write_index(index)

    def rollback(self) -> str | None:
        """Restore the previous champion; returns it (None when no champion remains)."""
        index = self._index()
        if not index["champions"]:
            raise CurateError(f"registry {self.root} has no champion to roll back")
        dropped = index["champions"].pop()
        current = index["champions"][-1] if index["champions"] else None
        index["history"].append({"action": "rollback", "version": dropped, "restored": current, "at": _now()})
        self._write_index(index)
        return current

    def gate_and_promote(self, version: str, cfg: GateConfig, champion_metrics: dict | None = None) -> Decision:
        """Apply the gate to registered `version` against the champion; promote when it passes.

        `champion_metrics` are the champion's metrics on the same held-out set (from the evaluate step); metrics
        they lack come from the champion's stored metrics.
        """
        champion = self.champion()
        if champion == version:
            champion = None
        if champion is not None:  # same-set metrics (if given) override the champion's stored ones
            champion_metrics = {**self.metrics(champion), **(champion_metrics or {})}
        decision = decide(self.metrics(version), champion_metrics if champion else None, cfg)
        if decision.promote:
            self.promote(version, reason="gate: " + "; ".join(decision.reasons))
        else:
            index = self._index()
            index["history"].append({"action": "refuse", "version": version, "at": _now(),
                                     "reason": "; ".join(decision.reasons)})
            self._write_index(index)
        return decision


# --------------------------------------------------------------------------------- simple functions (CLI)
def list_versions(root: str | Path) -> list[dict[str, Any]]:
    """Registered versions, oldest first, each with `champion: bool`."""
    return Registry(root).versions()


def format_versions(root: str | Path, metric: str = "reward.accuracy") -> str:
    """A text table of the registry for `curate registry list` (models: the version's artifact folders)."""
    reg = Registry(root)
    rows = reg.versions()
    if not rows:
        return f"{reg.root}: no registered models yet (run `curate gate`)"
    lines = [f"{'version':<8} {'round':>5} {'created':<25} {'models':<24} {metric:>16}  champion"]
    for v in rows:
        value = lookup(reg.metrics(v["id"]), metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        models = ",".join(v.get("files", [])) or "-"
        lines.append(f"{v['id']:<8} {v['round'] if v['round'] is not None else '-':>5} {v['created_at']:<25} "
                     f"{models:<24} {shown:>16}  {'*' if v['champion'] else ''}")
    return "\n".join(lines)


def promote(root: str | Path, version: str) -> None:
    """Manually make `version` the champion (`curate models promote`)."""
    Registry(root).promote(version, reason="manual")


def rollback(root: str | Path) -> str | None:
    """Restore the previous champion (`curate models rollback`); returns the new champion id or None."""
    return Registry(root).rollback()


def registry_root(cfg) -> Path:
    """The registry folder of a round config: `gate.registry` or `<project>/registry`."""
    return Path(cfg.gate.registry) if cfg.gate.registry else Path(cfg.project) / "registry"
