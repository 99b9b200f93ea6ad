"""The `compeffdist` command line.

Exit codes: 0 success; 2 a usage, config or input error (one line on stderr); 1 anything else
(a stage that could not produce output gets one line; an unexpected error its traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from compeffdist_ray import __version__
from compeffdist_ray.errors import UserError

log = logging.getLogger("compeffdist_ray")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"compeffdist: error: {message} (see '{self.prog} --help')\n")


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: the embedded local demo profile)")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (overrides run_dir in the config)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    from compeffdist_ray.stages import STAGES

    parser = _Parser(prog="compeffdist", description="COMPEFFDIST distillation of sentiment-analysis students on Ray.")
    parser.add_argument("--version", action="version", version=f"compeffdist-ray {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run every stage in order, skipping finished ones")
    _config_options(p)
    p.add_argument("--force", action="store_true", help="redo every stage, even finished ones")
    p.add_argument("--until", metavar="STAGE", choices=[s.name for s in STAGES],
                   help="stop after this stage (e.g. --until pairing to look at the pairs before paying for answers)")

    stage_list = "; ".join(f"{s.name}: {s.summary}" for s in STAGES)
    p = sub.add_parser("stage", help="run one stage", description=f"Stages: {stage_list}.")
    p.add_argument("name", choices=[s.name for s in STAGES], metavar="NAME", help="stage name")
    _config_options(p)
    p.add_argument("--force", action="store_true", help="redo the stage even if it is finished")

    p = sub.add_parser("status", help="the state of every stage of a run directory")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="run directory (default: the config's run_dir)")
    p.add_argument("--config", metavar="FILE", help="compare against this config instead of the run's own")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("report", help="write a run directory's self-contained HTML report")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    p.add_argument("--out", metavar="FILE", help="where to write it (default: RUN_DIR/report.html)")

    p = sub.add_parser("config", help="show the resolved config or the list of keys")
    csub = p.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    c = csub.add_parser("show", help="print the resolved config as YAML")
    _config_options(c)
    csub.add_parser("keys", help="list every config key with its type, default and meaning")

    p = sub.add_parser("models", help="list or fetch the registered models")
    msub = p.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    msub.add_parser("list", help="the model aliases and whether they are cached")
    m = msub.add_parser("pull", help="fetch and convert a model alias into the cache")
    m.add_argument("name", help="model alias")
    m.add_argument("--force", action="store_true", help="rebuild even if cached")

    _eval_parser(sub)
    _serve_parser(sub)
    return parser


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the teacher or the proxy difficulty model with Ray Serve",
                       description="Start a Ray Serve app on the local Ray (or ray.address) and block until Ctrl-C, "
                                   "or write a Serve config file for 'serve run' / 'serve deploy'. Every route but "
                                   "/health needs 'Authorization: Bearer <token>' (COMPEFFDIST_SERVE_TOKEN, "
                                   "serve.token_file, or a token generated into the cache).")
    ssub = p.add_subparsers(dest="serve_command", required=True, parser_class=_Parser)
    t = ssub.add_parser("teacher", help="the teacher as an OpenAI-compatible chat-completions server")
    t.add_argument("--config", metavar="FILE", help="pipeline config YAML (default: the embedded local demo profile)")
    r = ssub.add_parser("proxy", help="the proxy difficulty model (POST /proxy/v1/difficulty)")
    r.add_argument("--model", metavar="RUN_DIR_OR_PATH", required=True,
                   help="a proxy-mode run directory (with proxy/model) or a proxy model directory")
    r.add_argument("--config", metavar="FILE", help="config YAML for the serve section (default: the defaults)")
    for q in (t, r):
        q.add_argument("--host", metavar="H", help="address to listen on (serve.host, default 127.0.0.1)")
        q.add_argument("--port", metavar="P", type=int, help="port to listen on (serve.port, default 8000)")
        q.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")
    c = ssub.add_parser("config", help="write a Serve config file (serve run / serve deploy / KubeRay RayService)")
    c.add_argument("app", choices=["teacher", "proxy"], help="which app")
    c.add_argument("--config", metavar="FILE", help="pipeline config YAML the app is built from")
    c.add_argument("--model", metavar="RUN_DIR_OR_PATH", help="proxy: the model (default: <run_dir>/proxy/model)")
    c.add_argument("--out", metavar="FILE", help="where to write it (default: print it)")
    c.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides, kept in the file")


def _eval_parser(sub) -> None:
    from dataclasses import fields

    from compeffdist_ray.eval_runner import EvalConfig

    spec = {f.name: f for f in fields(EvalConfig)}

    def opt(flag: str, name: str, **kwargs):
        f = spec[name]
        default = "" if f.default is None else f" (default: {f.default})"
        kwargs.setdefault("metavar", name.upper().replace("_", "-"))
        p.add_argument(flag, dest=name, default=None, help=f.metadata["help"] + default, **kwargs)

    p = sub.add_parser(
        "eval", help="evaluate a model on SentiBench, or compare result files",
        description=("SentiBench protocol: k-shot classification read off the next-token logits of the "
                     "label tokens (macro-F1), ABSA answers as JSON lists (micro-F1); writes a JSON result "
                     "file and prints a Markdown table. Example: compeffdist eval --model smollm2-135m-instruct "
                     "--data-dir ../shared/sentibench --limit 50; compeffdist eval --compare a.json b.json"))
    opt("--model", "model", metavar="MODEL")
    opt("--data-dir", "data_dir", metavar="DIR")
    opt("--datasets", "datasets", metavar="A,B,...")
    opt("--k-shot", "k_shot", type=int, metavar="K")
    opt("--seed", "seed", type=int)
    opt("--limit", "limit", type=int, metavar="N")
    opt("--batch-size", "batch_size", type=int, metavar="B")
    opt("--max-new-tokens", "max_new_tokens", type=int, metavar="N")
    opt("--max-prompt-tokens", "max_prompt_tokens", type=int, metavar="N")
    opt("--demos", "demos", choices=["shared", "per-example"], metavar="{shared,per-example}")
    opt("--concurrency", "concurrency", type=int, metavar="N")
    opt("--num-cpus", "num_cpus", type=float, metavar="X")
    opt("--num-gpus", "num_gpus", type=float, metavar="X")
    opt("--dtype", "dtype", metavar="DTYPE")
    opt("--ray-address", "ray_address", metavar="ADDR")
    opt("--endpoint-model", "endpoint_model", metavar="NAME")
    opt("--api-key-env", "api_key_env", metavar="VAR")
    p.add_argument("--out", metavar="FILE", help="result JSON (default: eval-<model>-k<K>-seed<S>[-limit<N>].json here); "
                   "the per-example predictions go to FILE's stem + .predictions/")
    p.add_argument("--fresh", action="store_true", help="redo every dataset, even those an earlier run with the same "
                   "model, prompts and options saved in the predictions folder")
    p.add_argument("--compare", nargs="+", metavar="FILE", help="print these result files side by side instead")


def _load(args) -> "object":
    from compeffdist_ray.config import load_config

    overrides = list(args.overrides or [])
    if getattr(args, "run_dir", None):
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def status_table(statuses) -> str:
    header = ["stage", "state", "rows", "dropped", "tokens in", "tokens out", "wall time"]
    rows = []
    for s in statuses:
        m = s.manifest
        if m is None:
            rows.append([s.name, s.state, "-", "-", "-", "-", "-"])
            continue
        rows.append([s.name, s.state, _fmt_int(m.rows), _fmt_int(sum(m.dropped.values())),
                     _fmt_int(m.tokens.get("input", 0)), _fmt_int(m.tokens.get("output", 0)), f"{m.wall_time_s:.1f}s"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    details, notes = [], []
    for s in statuses:
        if s.manifest is not None and s.manifest.dropped:
            why = ", ".join(f"{k} {v}" for k, v in sorted(s.manifest.dropped.items()))
            details.append(f"  {s.name} dropped: {why}")
        note = _stage_note(s.name, s.manifest.stats) if s.manifest is not None else None
        if note:
            notes.append(f"  {s.name}: {note}")
    return "\n".join(lines + (["", "drops:"] + details if details else []) + (["", "notes:"] + notes if notes else []))


def _num(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _stage_note(name: str, stats: dict) -> str | None:
    """One line of the figures that matter most for a stage, from its manifest's stats."""
    try:
        if name in ("warmup", "finetune"):
            if not stats.get("enabled", True):
                return "disabled" + ("; difficulty scored with student.model" if name == "warmup" else "")
            return (f"{stats['samples']} samples, {stats['steps']} steps, loss {_num(stats['loss_first'])} -> "
                    f"{_num(stats['loss_last'])}, {_num(stats['tokens_per_s'], '.0f')} tokens/s, "
                    f"{stats['workers']} worker(s), ZeRO-{stats['zero_stage']}")
        if name == "difficulty":
            rank = stats["metrics"]["rank_score"]
            warn = f"; {len(stats['warnings'])} saturation warning(s)" if stats.get("warnings") else ""
            return f"scorer {stats['scorer']}, rank_score mean {_num(rank['mean'])} (p5 {_num(rank['p5'])}, p95 {_num(rank['p95'])}){warn}"
        if name == "proxy":
            m = stats["metrics"]
            return (f"held-out spearman {_num(m.get('spearman'))} (within tasks {_num(m.get('spearman_within_groups'))}), "
                    f"MAE {_num(m.get('mae'), '.4f')} vs {_num(m.get('mae_baseline'), '.4f')} constant; "
                    f"{m.get('n_train')} train / {m.get('n_eval')} held out")
        if name == "sampling":
            r = stats["report"]
            return f"kept {r['rows_after']:,} of {r['rows_before']:,} ({stats.get('warnings') and 'with warnings' or 'no warnings'})"
        if name == "evaluate":
            if stats.get("skipped"):
                return f"skipped ({stats['skipped']}; set evaluate.data_dir to a SentiBench copy)"
            means = ", ".join(f"{m} {100 * v:.1f}" for m, v in stats["mean_f1"].items() if v is not None)
            rows = f"first {stats['limit']} test rows" if stats.get("limit") else "full test sets"
            return (f"SentiBench mean F1 x100 {means} over {len(next(iter(stats['results'].values())))} dataset(s) "
                    f"(k={stats['k']}, {rows}; table in evaluate/comparison.md)")
        if name == "kept_responses":
            t = stats["teacher"]
            spent = t["answer_tokens_spent"]["input"] + t["answer_tokens_spent"]["output"]
            return (f"{t['answered']:,} of {t['pairs']:,} pairs answered in all; answer tokens spent {spent:,}, "
                    f"saved about {t['answer_tokens_saved_est']:,} ({t['saved_share_est']:.0%})")
    except (KeyError, TypeError):
        return None
    return None


def _cmd_status(args) -> int:
    import json

    import yaml

    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.config import config_from_dict, load_config
    from compeffdist_ray.pipeline import CONFIG_FILE, stage_statuses

    if args.run_dir is None and args.config is None:
        raise UserError("give a run directory: compeffdist status RUN_DIR")
    cfg = load_config(args.config) if args.config else None
    run_dir = args.run_dir or cfg.run_dir
    if "://" not in run_dir and not os.path.isdir(run_dir):
        raise UserError(f"run directory not found: {run_dir}")
    rd = RunDir(run_dir)
    if cfg is None:  # compare against the config the run itself was made with
        text = rd.read_text(CONFIG_FILE)
        if text is None:
            raise UserError(f"{run_dir} has no {CONFIG_FILE}: not a run directory (or give --config)")
        cfg = config_from_dict(yaml.safe_load(text) or {})
    statuses = stage_statuses(rd, cfg)
    if args.json:
        from dataclasses import asdict

        print(json.dumps([{"stage": s.name, "state": s.state, "manifest": asdict(s.manifest) if s.manifest else None}
                          for s in statuses], indent=2))
    else:
        print(f"run: {rd.uri}")
        print(status_table(statuses))
    return 0


def _cmd_models(args) -> int:
    from compeffdist_ray import models

    if args.models_command == "list":
        rows = models.list_models()
        header = ["name", "kind", "family", "cached", "source"]
        table = [[r["name"], r["kind"], r["family"], "yes" if r["cached"] else "no", r["source"]] for r in rows]
        widths = [max(len(str(x[i])) for x in [header, *table]) for i in range(len(header))]
        for r in [header, *table]:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        print(f"\ncache: {models.cache_dir()}  (set COMPEFFDIST_CACHE to move it)")
        return 0
    path = models.pull(args.name, force=args.force)
    print(path)
    return 0


def _cmd_config(args) -> int:
    from compeffdist_ray.config import dump_config, iter_help

    if args.config_command == "keys":
        for key, tp, default, text in iter_help():
            print(f"{key} ({tp}, default {default!r})\n    {text}")
        return 0
    print(dump_config(_load(args)), end="")
    return 0


def _cmd_eval(args) -> int:
    from compeffdist_ray import evaluation as ev

    if args.compare:
        given = [f"--{k.replace('_', '-')}" for k in ("model", "data_dir", "datasets", "limit") if getattr(args, k)]
        if given or args.out:
            raise UserError(f"--compare only reads result files; leave out {', '.join(given + ['--out'] * bool(args.out))}")
        results = [ev.load_result(p) for p in args.compare]
        print(ev.compare_table(results, ev.compare_names(results, args.compare)))
        settings = {(r.get("k"), r.get("seed"), r.get("limit"), r.get("demos")) for r in results}
        if len(settings) > 1:
            print("\nnote: the runs differ in k / seed / limit / demonstrations: "
                  + "; ".join(f"{p}: k={r.get('k')}, seed={r.get('seed')}, limit={r.get('limit')}, "
                              f"demos={r.get('demos')}" for p, r in zip(args.compare, results)))
        return 0
    if not args.model or not args.data_dir:
        raise UserError("eval needs --model MODEL and --data-dir DIR (or --compare FILE [FILE ...])")
    from compeffdist_ray.eval_runner import EvalConfig, default_out_path, predictions_dir_for, run_eval, write_result

    names = ("model", "data_dir", "datasets", "k_shot", "seed", "limit", "batch_size", "max_new_tokens",
             "max_prompt_tokens", "demos", "concurrency", "num_cpus", "num_gpus", "dtype", "ray_address", "endpoint_model",
             "api_key_env")
    cfg = EvalConfig(**{k: getattr(args, k) for k in names if getattr(args, k) is not None}, resume=not args.fresh)
    out = args.out or default_out_path(cfg)
    result = run_eval(cfg, predictions_dir=predictions_dir_for(out))
    path = write_result(result, out)
    print(f"model: {result['model']}, k={result['k']} ({result['demos']} demonstrations), seed={result['seed']}, "
          f"limit={result['limit']}; wall time {result['wall_time_s']:.1f} s")
    print(ev.results_table(result))
    for why in result["skipped"].values():
        print(f"skipped: {why}")
    print(f"results: {path} (per-example predictions in {result['predictions_dir']})")
    return 0


def _cmd_run(args) -> int:
    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.pipeline import run_one_stage, run_pipeline, stage_statuses

    cfg = _load(args)
    if args.command == "run":
        statuses = run_pipeline(cfg, force=args.force, until=args.until)
    else:
        run_one_stage(cfg, args.name, force=args.force)
        statuses = stage_statuses(RunDir(cfg.run_dir), cfg)
    print(f"run: {cfg.run_dir}")
    print(status_table(statuses))
    if args.command == "run":
        from compeffdist_ray.report import write_report

        try:
            print(f"report: {write_report(cfg.run_dir)}")
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded; say why the report did not
            log.warning("the run report was not written (%s: %s); try 'compeffdist report %s'",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", cfg.run_dir)
    return 0


def _cmd_serve(args) -> int:
    from compeffdist_ray.config import load_config

    if args.serve_command == "config":
        from compeffdist_ray.serving.deploy import serve_config_yaml

        overrides = list(args.overrides or [])
        cfg = load_config(args.config, overrides)
        text = serve_config_yaml(args.app, cfg, config_path=args.config, overrides=overrides, model=args.model,
                                 out=args.out)
        if args.out:
            from pathlib import Path

            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
            print(out)
        else:
            print(text, end="")
        return 0
    from compeffdist_ray.serving.launch import serve_forever

    overrides = list(args.overrides or [])
    if args.host:
        overrides.append(f"serve.host={args.host}")
    if args.port is not None:
        overrides.append(f"serve.port={args.port}")
    cfg = load_config(args.config, overrides)
    try:
        return serve_forever(args.serve_command, cfg, model=getattr(args, "model", None))
    except KeyboardInterrupt:  # while starting: Ray shuts down with the process
        print("compeffdist: interrupted while starting the app; nothing is served", file=sys.stderr)
        return 130


def _cmd_report(args) -> int:
    from compeffdist_ray.report import write_report

    if "://" not in args.run_dir and not os.path.isdir(args.run_dir):
        raise UserError(f"run directory not found: {args.run_dir}")
    print(write_report(args.run_dir, args.out))
    return 0


def _root_cause(exc: BaseException) -> BaseException:
    """The user-facing error inside Ray's wrappers (RayTaskError etc.), if there is one."""
    from compeffdist_ray.stages._common import StageFailed

    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (UserError, StageFailed)):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__
    # Errors raised inside Ray workers can reach the driver with their chain flattened into
    # text; the original class and message are still in it.
    for line in str(exc).splitlines():
        for cls in (UserError, StageFailed):
            marker = f"{cls.__module__}.{cls.__name__}: "
            if marker in line:
                return cls(line.split(marker, 1)[1].strip())
    return exc


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: torch's CPU threads in this process and in
    # the local Ray workers it starts (they inherit the environment) then give their cores to
    # whatever else runs, which on a shared machine made each model step 3-5x slower
    # (benchmarks/README.md, serving). Set OMP_WAIT_POLICY yourself to choose otherwise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    # Overrides may stand before or after options (`stage tasks --config F a.b=1`): argparse
    # leaves the later ones unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides or []) + extra
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[compeffdist] %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    commands = {"run": _cmd_run, "stage": _cmd_run, "status": _cmd_status, "config": _cmd_config, "models": _cmd_models,
                "eval": _cmd_eval, "report": _cmd_report, "serve": _cmd_serve}
    from compeffdist_ray.stages._common import StageFailed

    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("compeffdist: interrupted; finished stages are kept, the interrupted one will be redone", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into exit codes
        cause = _root_cause(exc)
        if isinstance(cause, UserError):
            print(f"compeffdist: error: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}", file=sys.stderr)
            return 2
        if isinstance(cause, StageFailed):
            print(f"compeffdist: stage failed: {cause}", file=sys.stderr)
            return 1
        raise


def entrypoint() -> None:
    sys.exit(main())
