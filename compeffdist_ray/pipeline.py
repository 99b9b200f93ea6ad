"""Runs stages in order, skipping the finished ones and redoing stale or half-done ones.

A stage is *done* when its manifest's fingerprint equals the hash of its config view and the
output ids of its inputs' manifests; *stale* when it has a manifest that no longer matches (or
an input is not done); *incomplete* when its folder has no manifest (killed half-way); and
*missing* when it never ran.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from compeffdist_ray.artifacts import Manifest, RunDir, fingerprint
from compeffdist_ray.config import Config, dump_config
from compeffdist_ray.errors import UserError
from compeffdist_ray.stages import active_stage_names, get_stage, load_stage_module
from compeffdist_ray.stages._common import StageContext

log = logging.getLogger("compeffdist_ray")

__all__ = ["StageStatus", "stage_statuses", "run_pipeline", "run_one_stage", "preflight", "ensure_ray"]

CONFIG_FILE = "config.yaml"


@dataclass
class StageStatus:
    name: str
    state: str  # done | stale | incomplete | missing | waiting
    expected: str | None
    manifest: Manifest | None
    input_ids: dict[str, str]


def _status(rd: RunDir, cfg: Config, name: str, done: dict[str, bool]) -> StageStatus:
    mod = load_stage_module(name)
    manifest = rd.read_manifest(name)
    ups = mod.inputs(cfg)
    input_ids, ready = {}, True
    for up in ups:
        up_manifest = rd.read_manifest(up)
        if up_manifest is None or not done.get(up, False):
            ready = False
        else:
            input_ids[up] = up_manifest.output_id
    expected = None
    if ready:
        expected = fingerprint({"stage": name, "version": mod.VERSION, "config": mod.config_view(cfg), "inputs": input_ids})
    if manifest is not None:
        state = "done" if expected is not None and manifest.fingerprint == expected else "stale"
    elif rd.state(name) == "incomplete":
        state = "incomplete"
    else:
        state = "missing" if ready else "waiting"
    return StageStatus(name, state, expected, manifest, input_ids)


def stage_statuses(rd: RunDir, cfg: Config) -> list[StageStatus]:
    out, done = [], {}
    for name in active_stage_names(cfg):
        st = _status(rd, cfg, name, done)
        done[name] = st.state == "done"
        out.append(st)
    return out


def ensure_ray(cfg: Config) -> None:
    """`ray.init()` on this machine, or connect to `ray.address`; once per process."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = dict(address=cfg.ray.address, include_dashboard=cfg.ray.include_dashboard,
                        logging_level=logging.WARNING, log_to_driver=True)
    inside_job = bool(os.environ.get("RAY_ADDRESS"))  # a Ray job's driver: ray.init() joins the job's cluster
    if cfg.ray.address is None and cfg.ray.num_cpus is not None and not inside_job:
        kwargs["num_cpus"] = cfg.ray.num_cpus  # sizes a local instance; a cluster has its own resources
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.print_on_execution_start = False


def preflight(cfg: Config, names: list[str]) -> None:
    """Cheap checks of everything the stages will need, before any heavy work starts."""
    needs: set[str] = set()
    for name in names:
        needs.update(getattr(load_stage_module(name), "REQUIRES", ()))
    if "corpus" in needs:
        from compeffdist_ray.inputs import read_corpus

        read_corpus(cfg.input)
    if "attribute_list" in needs and cfg.perspectives.attribute_list:
        from compeffdist_ray.stages.perspectives import read_attribute_list

        read_attribute_list(cfg.perspectives.attribute_list)
    if "embedding" in needs:
        from compeffdist_ray.models import resolve_model

        resolve_model(cfg.embedding.model, kind="embedding")
    if "student" in needs:
        from compeffdist_ray.models import resolve_model

        resolve_model(cfg.student.model)
    if "teacher" in needs:
        from compeffdist_ray.teacher import check_backend

        if cfg.teacher.backend == "serve":  # the app lives on the Ray cluster: connect first, to look it up
            ensure_ray(cfg)
        check_backend(cfg.teacher)
    for name in names:  # a stage's own checks (e.g. the scorer's tokenizer)
        check = getattr(load_stage_module(name), "preflight", None)
        if check is not None:
            check(cfg)


def _execute(rd: RunDir, cfg: Config, st: StageStatus) -> Manifest:
    mod = load_stage_module(st.name)
    rd.clear_stage(st.name)
    if mod.NEEDS_RAY:
        ensure_ray(cfg)
    log.info("%s: running (%s)", st.name, get_stage(st.name).summary)
    t0 = time.perf_counter()
    out = mod.run(StageContext(cfg=cfg, run=rd, stage=st.name, fingerprint=st.expected or ""))
    manifest = Manifest(
        stage=st.name,
        fingerprint=st.expected or "",
        rows=out.rows,
        dropped=out.dropped,
        tokens=out.tokens,
        wall_time_s=round(time.perf_counter() - t0, 2),
        inputs=st.input_ids,
        stats=out.stats,
    )
    rd.write_manifest(manifest)  # last: the stage counts as done only from here on
    dropped = sum(out.dropped.values())
    log.info("%s: done, %d rows, %d dropped, tokens in/out %d/%d, %.1f s", st.name, out.rows, dropped,
             out.tokens.get("input", 0), out.tokens.get("output", 0), manifest.wall_time_s)
    return manifest


def _open_run(cfg: Config) -> RunDir:
    rd = RunDir(cfg.run_dir)
    rd.write_text(CONFIG_FILE, dump_config(cfg))
    return rd


def run_pipeline(cfg: Config, *, force: bool = False, until: str | None = None) -> list[StageStatus]:
    """Every stage in order (through `until` when given): finished ones skipped, the rest (re)done."""
    names = list(active_stage_names(cfg))
    if until is not None:
        if until not in names:
            get_stage(until)  # an unknown name gets the list of stages
            raise UserError(f"--until {until}: that stage is not part of this run (it has: {', '.join(names)})")
        names = names[:names.index(until) + 1]
    rd = RunDir(cfg.run_dir)
    todo = [s.name for s in stage_statuses(rd, cfg) if s.name in names and (force or s.state != "done")]
    preflight(cfg, todo)
    rd = _open_run(cfg)
    done: dict[str, bool] = {}
    for name in names:
        st = _status(rd, cfg, name, done)
        if st.state == "done" and not force:
            log.info("%s: already done (rows %d), skipped", name, st.manifest.rows if st.manifest else 0)
        else:
            if st.state == "stale":
                log.info("%s: config or inputs changed since it ran: redoing", name)
            elif st.state == "incomplete":
                log.info("%s: a previous run stopped half-way: redoing", name)
            _execute(rd, cfg, _status(rd, cfg, name, done))
        done[name] = True
    return stage_statuses(rd, cfg)


def run_one_stage(cfg: Config, name: str, *, force: bool = False) -> StageStatus:
    """One stage; its inputs must be done already."""
    spec = get_stage(name)
    if name not in active_stage_names(cfg):
        raise UserError(f"stage '{name}' runs in proxy mode only: add filtering.proxy.enabled=true"
                        if spec.proxy_mode_only else f"stage '{name}' is not part of this run")
    rd = RunDir(cfg.run_dir)
    statuses = {s.name: s for s in stage_statuses(rd, cfg)}
    missing = [up for up in load_stage_module(name).inputs(cfg) if statuses[up].state != "done"]
    if missing:
        states = ", ".join(f"{up} ({statuses[up].state})" for up in missing)
        raise UserError(
            f"stage '{name}' needs {states} in {rd.uri}; run 'compeffdist run' or "
            f"'compeffdist stage {missing[0]}' first"
        )
    st = statuses[name]
    if st.state == "done" and not force:
        log.info("%s: already done (rows %d), skipped; use --force to redo it", name, st.manifest.rows)
        return st
    preflight(cfg, [name])
    rd = _open_run(cfg)
    _execute(rd, cfg, st)
    return {s.name: s for s in stage_statuses(rd, cfg)}[name]
