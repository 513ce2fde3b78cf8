"""Run a step's work over a pool split into shards: in this process, or as Ray tasks on a cluster.

Generation and scoring are embarrassingly parallel over prompts. `map_shards` splits the work into shards,
runs `fn(shard, **kwargs)` for each (each Ray task builds its own backend, e.g. a vLLM engine on its node), and
returns the results in shard order, so the caller's output is identical whether it ran locally or on Ray.

    ShardingConfig(backend="ray", address="auto", num_shards=8, num_cpus_per_shard=4, num_gpus_per_shard=1)

`address: auto` joins a running cluster (`ray start --head` on the head node, `ray start --address=...` on the
others); `local` starts a single-node Ray inside this process (what the tests use). Ray is an optional extra
(`pip install -e '.[ray]'`). Results travel through Ray's object store (serialized by Ray); nothing is stored
with pickle: each shard's result is written by the caller with the project's parquet/jsonl writers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from preference.plumbing.errors import CurateError

T = TypeVar("T")


@dataclass
class ShardingConfig:
    backend: Literal["none", "ray"] = "none"
    address: str = "local"  # "local" (start Ray in-process), "auto" (join a running cluster) or "ray://host:port"
    num_shards: int = 1
    num_cpus_per_shard: float = 1.0
    num_gpus_per_shard: float = 0.0

    def __post_init__(self):
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be ≥ 1, got {self.num_shards}")
        if self.num_cpus_per_shard <= 0:
            raise ValueError(f"num_cpus_per_shard must be > 0, got {self.num_cpus_per_shard}")


def split(items: Sequence[T], num_shards: int) -> list[list[T]]:
    """Contiguous, balanced shards (sizes differ by at most one); empty shards are dropped."""
    n = len(items)
    bounds = [round(i * n / num_shards) for i in range(num_shards + 1)]
    return [list(items[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise CurateError(
            "sharding.backend is 'ray' but Ray is not installed; `pip install -e '.[ray]'` or set "
            "sharding.backend: none"
        ) from exc
    return ray


@contextmanager
def session(cfg: ShardingConfig) -> Iterator[None]:
    """Several `map_shards` calls in one Ray session (started here unless one is running; stopped after)."""
    if cfg.backend == "none":
        yield
        return
    ray = _ray()
    started_here = False
    if not ray.is_initialized():
        _init(ray, cfg, cfg.num_shards)
        started_here = True
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def _init(ray, cfg: ShardingConfig, shards: int) -> None:
    if cfg.address == "local":
        ray.init(num_cpus=max(1, int(cfg.num_cpus_per_shard * shards)), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=cfg.address, log_to_driver=False)


def map_shards(fn: Callable[..., Any], items: Sequence[Any], cfg: ShardingConfig, **kwargs: Any) -> list[Any]:
    """Apply `fn(shard, **kwargs)` to each shard of `items`; results in shard order.

    `fn` must be a module-level function (Ray ships it to workers by reference).
    """
    shards = split(items, cfg.num_shards)
    if cfg.backend == "none":
        return [fn(shard, **kwargs) for shard in shards]
    ray = _ray()
    started_here = False
    if not ray.is_initialized():
        _init(ray, cfg, len(shards))
        started_here = True
    try:
        remote = ray.remote(num_cpus=cfg.num_cpus_per_shard, num_gpus=cfg.num_gpus_per_shard)(fn)
        return ray.get([remote.remote(shard, **kwargs) for shard in shards])
    finally:
        if started_here:
            ray.shutdown()
