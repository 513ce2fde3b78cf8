from dataclasses import dataclass

import pytest

from preference.plumbing.errors import CurateError
from preference.plumbing.io import read_rows, write_rows
from preference.plumbing.store import Project


@dataclass
class Cfg:
    n: int = 1


def _run(rnd, name, cfg, inputs=(), fail=False, force=False):
    run = rnd.start_step(name, cfg, inputs=inputs, seeds={"seed": 0}, force=force)
    if run is None:
        return None
    with run:
        write_rows(run.path / "out.parquet", [{"x": i} for i in range(cfg.n)])
        run.counts["rows"] = cfg.n
        if fail:
            raise RuntimeError("boom")
    return rnd.step(name).manifest()


def test_manifest_written_last_and_skip(tmp_path):
    project = Project(tmp_path / "proj")
    rnd = project.round(create=True)
    assert rnd.path.name == "round-0001"
    m = _run(rnd, "pool", Cfg(3))
    assert m["counts"] == {"rows": 3} and m["seeds"] == {"seed": 0}
    assert "torch" in m["packages"] and m["outputs"] == {"out.parquet": m["outputs"]["out.parquet"]}
    assert _run(rnd, "pool", Cfg(3)) is None  # finished with the same config: skipped
    with pytest.raises(CurateError, match="different config.*--force"):
        _run(rnd, "pool", Cfg(4))
    m2 = _run(rnd, "pool", Cfg(4), force=True)
    assert m2["counts"]["rows"] == 4
    assert len(read_rows(rnd.step("pool").file("out.parquet"))) == 4


def test_crashed_step_has_no_manifest_and_reruns(tmp_path):
    project = Project(tmp_path)
    rnd = project.round(create=True)
    with pytest.raises(RuntimeError):
        _run(rnd, "generate", Cfg(2), fail=True)
    assert not rnd.step("generate").done
    status = {r["step"]: r for r in project.status()}
    assert status["generate"]["status"] == "failed" and "boom" in status["generate"]["error"]
    assert _run(rnd, "generate", Cfg(2))["counts"]["rows"] == 2
    assert {r["step"]: r["status"] for r in project.status()} == {"generate": "done"}


def test_upstream_change_makes_downstream_stale(tmp_path):
    rnd = Project(tmp_path).round(create=True)
    _run(rnd, "pool", Cfg(1))
    _run(rnd, "generate", Cfg(1), inputs=(rnd.step("pool"),))
    assert _run(rnd, "generate", Cfg(1), inputs=(rnd.step("pool"),)) is None
    _run(rnd, "pool", Cfg(2), force=True)
    with pytest.raises(CurateError, match="different config or inputs"):
        _run(rnd, "generate", Cfg(1), inputs=(rnd.step("pool"),))


def test_missing_upstream_is_a_clear_error(tmp_path):
    rnd = Project(tmp_path).round(create=True)
    with pytest.raises(CurateError, match="needs step 'pool'.*curate pool"):
        _run(rnd, "generate", Cfg(1), inputs=(rnd.step("pool"),))
    with pytest.raises(CurateError, match="has not finished"):
        rnd.step("pool").file("out.parquet")


def test_rounds_and_index(tmp_path):
    project = Project(tmp_path)
    with pytest.raises(CurateError, match="round 2 does not exist"):
        project.round(2)
    r1 = project.round(create=True)
    r2 = project.new_round()
    assert (r1.number, r2.number) == (1, 2) and r2.previous().number == 1 and r1.previous() is None
    assert project.round().number == 2
    _run(r2, "pool", Cfg(1))
    (r2.step("pool").manifest_path).unlink()  # deleted by hand: the step re-runs
    assert {(r["round"], r["step"]): r["status"] for r in project.status()}[(2, "pool")] == "missing"
    assert _run(r2, "pool", Cfg(1)) is not None
