"""Rows of a DataFrame through a model on a Ray Data actor pool, with nothing lost on the way.

Every model pass of the pipeline (teacher generation, difficulty scoring, proxy prediction)
has the same shape: a pandas frame with a unique key column goes into Ray Data, a callable
class loads its model once per actor and maps batches, the output comes back as pandas. What
they share lives here: block sizing, the actor-pool strategy, and the check that every input
key came back exactly once (a lost or duplicated row is an error, never a silent drop).
"""

from __future__ import annotations

from typing import Any

from compeffdist_ray.stages._common import StageFailed

__all__ = ["RowsLost", "map_on_actor_pool", "stream_on_actor_pool", "in_input_order"]


class RowsLost(StageFailed):
    """A model pass returned a different set of rows than it was given (the stage fails, exit 1)."""


def in_input_order(frame, out, key: str, what: str):
    """``out`` with exactly one row per key of ``frame``, in ``frame``'s order, or RowsLost."""
    want = list(frame[key])
    got = out[key]
    missing = set(want) - set(got)
    if missing or got.duplicated().any() or len(out) != len(want):
        extra = len(out) - (len(want) - len(missing))
        raise RowsLost(f"{what}: {len(want)} rows in, {len(out)} out ({len(missing)} lost, e.g. "
                       f"{sorted(map(str, missing))[:3]}; {max(0, extra)} unexpected or repeated)")
    return out.set_index(key).loc[want].reset_index()


def stream_on_actor_pool(frame, udf: type, *, constructor_kwargs: dict[str, Any], batch_size: int,
                         concurrency: int, num_cpus: float, num_gpus: float, what: str):
    """Map ``udf`` (a callable class: ``__init__`` loads the model, ``__call__`` maps a pandas batch)
    over ``frame`` on an actor pool of 1..``concurrency`` actors; yields output frames as they come.

    The frame is cut into blocks of about ``batch_size`` rows so that the pool has work to share
    from the start (a frame from pandas is one block otherwise). Output batches arrive in no
    particular order: callers that need them all use :func:`map_on_actor_pool`.
    """
    import math

    import ray

    if len(frame) == 0:
        raise ValueError(f"{what}: no rows to map")
    blocks = max(1, math.ceil(len(frame) / max(batch_size, 1)))
    ds = ray.data.from_pandas(frame.reset_index(drop=True)).repartition(blocks)
    out = ds.map_batches(
        udf,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    yield from out.iter_batches(batch_size=None, batch_format="pandas")


def map_on_actor_pool(frame, udf: type, *, key: str, constructor_kwargs: dict[str, Any], batch_size: int,
                      concurrency: int, num_cpus: float, num_gpus: float, what: str):
    """:func:`stream_on_actor_pool`, collected: the output frame in input order, or RowsLost."""
    import pandas as pd

    parts = list(stream_on_actor_pool(frame, udf, constructor_kwargs=constructor_kwargs, batch_size=batch_size,
                                      concurrency=concurrency, num_cpus=num_cpus, num_gpus=num_gpus, what=what))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({key: []})
    return in_input_order(frame, out, key, what)
