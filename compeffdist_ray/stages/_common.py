"""What stage modules share: the context they run in and the summary they return."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from compeffdist_ray.artifacts import RunDir
from compeffdist_ray.config import Config, TeacherConfig

# Keys that change how fast a teacher runs, never what it answers: left out of fingerprints so
# that resizing a run does not redo finished stages.
_RESOURCE_KEYS = {"batch_size", "concurrency", "num_cpus", "num_gpus", "max_concurrency", "timeout_s",
                  "max_retries", "backoff_s", "accelerator_type", "gpu_memory_utilization", "prefix_reuse"}


class StageFailed(Exception):
    """A stage ran but cannot produce a usable output (CLI exit code 1, one line)."""


@dataclass
class StageContext:
    cfg: Config
    run: RunDir
    stage: str
    fingerprint: str = ""  # of this stage's config view and inputs (names resumable work such as training)


@dataclass
class StageOutput:
    rows: int
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=lambda: {"input": 0, "output": 0})
    stats: dict[str, Any] = field(default_factory=dict)


def without_resources(obj: Any) -> Any:
    """A config section (as a dict, nested) without the keys that only change speed."""
    if isinstance(obj, dict):
        return {k: without_resources(v) for k, v in obj.items() if k not in _RESOURCE_KEYS}
    return obj


def teacher_view(cfg: TeacherConfig) -> dict:
    """The teacher settings that change its answers (for fingerprints)."""
    return without_resources(dataclasses.asdict(cfg))


def generation_drops(frame, prefix: str = "") -> dict[str, int]:
    """Failed rows of a generation frame, counted by reason (e.g. {'unparseable': 3})."""
    reasons = Counter()
    for ok, err in zip(frame["ok"], frame["error"]):
        if not ok:
            reasons[prefix + (err if isinstance(err, str) and err else "unknown").split(":")[0]] += 1
    return dict(reasons)


def generation_tokens(*frames) -> dict[str, int]:
    return {
        "input": int(sum(int(f["input_tokens"].sum()) for f in frames if len(f))),
        "output": int(sum(int(f["output_tokens"].sum()) for f in frames if len(f))),
    }


def merge_counts(*dicts: dict[str, int]) -> dict[str, int]:
    out: Counter = Counter()
    for d in dicts:
        out.update(d)
    return dict(out)
