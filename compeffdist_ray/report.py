"""The run report: one self-contained HTML file that shows what a run did and whether it worked.

`write_report(run_dir)` reads only the run directory (manifests, artifacts, `config.yaml`) and
writes `<run_dir>/report.html`: no network, no external files (charts are PNGs embedded as
data URIs, the style sheet is inline), so the file can be mailed or opened from a bucket. Every
section is optional: a stage that has not run yet shows as such, never as an error.

    $ compeffdist report runs/local-demo
    runs/local-demo/report.html

Sections: the stage table (state, rows, drops by reason, teacher tokens, wall time) with each
stage's headline note; perspectives and their sizes; examples of attributes, tasks and
demonstrations; difficulty histograms and saturation warnings; sampling (group coverage and
class balance before and after); training loss curves; evaluation results when the run has them.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone
from typing import Any

from compeffdist_ray.errors import UserError

__all__ = ["REPORT_FILE", "build_report", "write_report"]

REPORT_FILE = "report.html"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#5b6475;margin:0 0 12px}
table{border-collapse:collapse;background:#fff;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #d8dce3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.state-done{color:#17703a;font-weight:600}.state-stale,.state-incomplete{color:#a15c00;font-weight:600}
.state-missing,.state-waiting{color:#7a8190}
.warn{background:#fff4e0;border-left:4px solid #e0a030;padding:6px 10px;margin:6px 0}
.note{color:#5b6475}.charts{display:flex;flex-wrap:wrap;gap:12px}
.charts figure{margin:0;background:#fff;border:1px solid #d8dce3;padding:6px;max-width:520px}
.charts.small figure{max-width:330px}
.charts figcaption{font-size:12px;color:#5b6475;text-align:center}
img{max-width:100%;height:auto;display:block}code{background:#eef0f4;padding:0 3px;border-radius:3px}
details{background:#fff;border:1px solid #d8dce3;padding:6px 10px;margin:6px 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = ",") -> str:
    if value is None:
        return "-"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return _e(value)


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>'


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figure(width: float = 5.0, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _bar_chart(labels: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> bytes:
    import numpy as np

    fig, ax = _figure(max(5.0, 0.45 * len(labels) + 2), 3.2)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, [lab if len(lab) <= 22 else lab[:21] + "…" for lab in labels], rotation=35, ha="right",
                  fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def _loss_chart(histories: dict[str, Any]) -> bytes:
    fig, ax = _figure(5.5, 3.0)
    for name, hist in histories.items():
        ax.plot(hist["step"], hist["loss"], marker="o", markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


def _stages_section(statuses) -> str:
    from compeffdist_ray.cli import _stage_note

    rows, drops, notes = [], [], []
    for s in statuses:
        m = s.manifest
        state = f'<span class="state-{_e(s.state)}">{_e(s.state)}</span>'
        if m is None:
            rows.append([_e(s.name), state, "-", "-", "-", "-", "-"])
            continue
        rows.append([_e(s.name), state, _num(m.rows), _num(sum(m.dropped.values())), _num(m.tokens.get("input", 0)),
                     _num(m.tokens.get("output", 0)), f"{m.wall_time_s:,.1f} s"])
        if m.dropped:
            drops.append(f"<li><b>{_e(s.name)}</b>: " + ", ".join(f"{_e(k)} {v:,}" for k, v in sorted(m.dropped.items()))
                         + "</li>")
        note = _stage_note(s.name, m.stats)
        if note:
            notes.append(f"<li><b>{_e(s.name)}</b>: {_e(note)}</li>")
    done = [s.manifest for s in statuses if s.manifest is not None]
    total = sum(m.wall_time_s for m in done)
    tokens_in = sum(m.tokens.get("input", 0) for m in done)
    tokens_out = sum(m.tokens.get("output", 0) for m in done)
    out = ["<h2>Stages</h2>",
           _table(["stage", "state", "rows", "dropped", "tokens in", "tokens out", "wall time"], rows, {2, 3, 4, 5, 6}),
           f'<p class="note">{len(done)} of {len(statuses)} stages have output; {total:,.1f} s of stage wall time; '
           f"teacher tokens {tokens_in:,} in, {tokens_out:,} out.</p>"]
    if drops:
        out += ["<h3>Drops, by reason</h3>", "<ul>" + "".join(drops) + "</ul>"]
    if notes:
        out += ["<h3>Headline figures</h3>", "<ul>" + "".join(notes) + "</ul>"]
    return "\n".join(out)


def _perspectives_section(rd) -> str:
    if not rd.exists("perspectives", "perspectives.parquet"):
        return ""
    df = rd.read_df("perspectives", "perspectives")
    weight = "total_count" if "total_count" in df else "size"
    top = df.sort_values([weight, "size"], ascending=False).head(30)
    chart = _bar_chart([str(n) for n in top["name"]], {"attribute mentions": [int(v) for v in top[weight]],
                                                       "distinct attributes": [int(v) for v in top["size"]]},
                       f"perspectives by attribute mentions (top {len(top)} of {len(df)})", "attributes")
    rows = [[_e(r["name"]), _num(int(r[weight])), _num(int(r["size"])),
             _e(", ".join(map(str, list(r["attributes"])[:8])))] for _, r in top.head(12).iterrows()]
    return "\n".join(["<h2>Perspectives</h2>", f'<div class="charts">{_img(chart, "perspective sizes")}</div>',
                      _table(["perspective", "mentions", "distinct", "attributes (first 8)"], rows, {1, 2})])


def _examples_section(rd) -> str:
    out = []
    if rd.exists("attributes", "attribute_counts.parquet"):
        counts = rd.read_df("attributes", "attribute_counts").sort_values("count", ascending=False).head(20)
        out += ["<h3>Most frequent attributes</h3>",
                _table(["attribute", "count"], [[_e(r["attribute"]), _num(int(r["count"]))] for _, r in counts.iterrows()],
                       {1})]
    if rd.exists("tasks", "tasks.parquet"):
        tasks = rd.read_df("tasks", "tasks").head(6)
        for _, t in tasks.iterrows():
            demos = list(t["demonstrations"]) if t["demonstrations"] is not None else []
            demo_rows = [[_e(d.get("text", "")), _e(d.get("output", ""))] for d in demos[:3]]
            out.append(f"<details><summary><b>{_e(t['name'])}</b> ({_e(t['perspective'])}, "
                       f"{len(demos)} demonstrations)</summary><p>{_e(t['instruction'])}</p>"
                       + (_table(["text", "teacher's answer"], demo_rows) if demo_rows else "") + "</details>")
    if not out:
        return ""
    return "\n".join(["<h2>Examples: attributes, tasks and demonstrations</h2>", *out])


def _difficulty_section(rd) -> str:
    m = rd.read_manifest("difficulty")
    if m is None:
        return ""
    figs = []
    for name in m.stats.get("histograms", []):
        png = rd.read_bytes("difficulty", name)
        if png:
            figs.append(_img(png, name.removeprefix("hist_").removesuffix(".png")))
    metrics = m.stats.get("metrics", {})
    rows = [[_e(k), _num(v.get("mean"), ".4f"), _num(v.get("p5"), ".4f"), _num(v.get("p50", v.get("median")), ".4f"),
             _num(v.get("p95"), ".4f")] for k, v in metrics.items() if isinstance(v, dict)]
    warns = "".join(f'<div class="warn">{_e(w)}</div>' for w in m.stats.get("warnings", []))
    return "\n".join(["<h2>Difficulty</h2>", f'<p class="note">scored by {_e(m.stats.get("scorer", "?"))}</p>', warns,
                      _table(["metric", "mean", "p5", "median", "p95"], rows, {1, 2, 3, 4}) if rows else "",
                      f'<div class="charts small">{"".join(figs)}</div>'])


def _sampling_section(rd) -> str:
    m = rd.read_manifest("sampling")
    if m is None:
        return ""
    r = m.stats.get("report", {})
    groups = r.get("groups") or {}
    rows = [["rows", _num(r.get("rows_before")), _num(r.get("rows_after"))],
            ["groups", _num(groups.get("groups_before")), _num(groups.get("groups_after"))],
            ["rows per group (min / median / max)",
             " / ".join(_num(groups.get("rows_per_group_before", {}).get(k)) for k in ("min", "median", "max")),
             " / ".join(_num(groups.get("rows_per_group_after", {}).get(k)) for k in ("min", "median", "max"))],
            [f"mean {_e(r.get('params', {}).get('score_col', 'score'))}", _num(r.get("score_mean_before"), ".4f"),
             _num(r.get("score_mean_after"), ".4f")]]
    out = ["<h2>Sampling</h2>",
           f'<p class="note">{_e(r.get("params", {}).get("method", "?"))}, keep ratio '
           f'{_e(r.get("params", {}).get("keep_ratio", "?"))}, grouped by {_e(r.get("params", {}).get("group_col", "?"))}</p>',
           "".join(f'<div class="warn">{_e(w)}</div>' for w in m.stats.get("warnings", [])),
           _table(["", "before", "after"], rows, {1, 2})]
    labels = r.get("labels") or {}
    before, after = labels.get("before", {}).get("counts", {}), labels.get("after", {}).get("counts", {})
    if before:
        classes = sorted(before, key=lambda c: -before[c])
        chart = _bar_chart(classes, {"before": [before[c] for c in classes], "after": [after.get(c, 0) for c in classes]},
                           "class balance before and after sampling", "rows")
        out += [f'<div class="charts">{_img(chart, "class balance")}</div>',
                _table(["class", "before", "after"], [[_e(c), _num(before[c]), _num(after.get(c, 0))] for c in classes],
                       {1, 2})]
    else:
        n = labels.get("before", {}).get("unlabelled", r.get("rows_before"))
        out.append(f'<p class="note">No class balance: none of the {_num(n)} responses is a single label '
                   f"(free-text answers).</p>")
    return "\n".join(out)


def _training_section(rd) -> str:
    histories, rows = {}, []
    for stage in ("warmup", "finetune"):
        m = rd.read_manifest(stage)
        if m is None or not m.stats.get("enabled", True) or not rd.exists(stage, "history.parquet"):
            continue
        hist = rd.read_df(stage, "history")
        if len(hist):
            histories[stage] = hist
        s = m.stats
        rows.append([_e(stage), _num(s.get("samples")), _num(s.get("steps")), _num(s.get("loss_first"), ".4f"),
                     _num(s.get("loss_last"), ".4f"), _num(s.get("tokens_per_s"), ".1f"),
                     f"{_num(s.get('workers'))} x ZeRO-{_e(s.get('zero_stage', '?'))}"])
    if not histories:
        return ""
    return "\n".join(["<h2>Training</h2>",
                      _table(["stage", "samples", "steps", "first loss", "last loss", "tokens/s", "workers"], rows,
                             {1, 2, 3, 4, 5}),
                      f'<div class="charts">{_img(_loss_chart(histories), "training loss per optimizer step")}</div>'])


def _evaluation_section(rd) -> str:
    m = rd.read_manifest("evaluate")
    how = ("set <code>evaluate.data_dir</code> to a SentiBench copy and run <code>compeffdist run</code> again, or "
           "run <code>compeffdist eval --model RUN/finetune/model --data-dir SENTIBENCH</code>")
    if m is None:
        return f'<h2>Evaluation</h2><p class="note">This run has no evaluation yet: {how}.</p>'
    if m.stats.get("skipped"):
        return f'<h2>Evaluation</h2><p class="note">Skipped ({_e(m.stats["skipped"])}): {how}.</p>'
    results = m.stats.get("results", {})  # model -> dataset -> {kind, n, metrics}
    names = list(results)
    datasets = list(dict.fromkeys(d for per in results.values() for d in per))
    rows = []
    for d in datasets:
        first = next(per[d] for per in results.values() if d in per)
        cells = []
        for n in names:
            b = results[n].get(d)
            cells.append("-" if b is None else _num(100 * b.get("macro_f1", b.get("f1", 0.0)), ".1f"))
        rows.append([_e(d), _e(first.get("kind", "")), _num(first.get("n"))] + cells)
    means = m.stats.get("mean_f1", {})
    rows.append(["<b>mean</b>", "", ""] + [_num(None if means.get(n) is None else 100 * means[n], ".1f") for n in names])
    models = m.stats.get("models", {})
    limit = m.stats.get("limit")
    note = (f"SentiBench F1 x100 (macro-F1 for classification, micro-F1 over exact tuples for ABSA), "
            f"k = {_e(m.stats.get('k'))} demonstrations ({_e(m.stats.get('demos', 'shared'))} draw), "
            f"seed {_e(m.stats.get('seed'))}, "
            + (f"first {_e(limit)} test rows of each dataset" if limit else "full test sets") + "; models: "
            + "; ".join(f"<b>{_e(n)}</b> <code>{_e(models.get(n, '?'))}</code>" for n in names) + ".")
    return "\n".join(["<h2>Evaluation</h2>", f'<p class="note">{note}</p>',
                      _table(["dataset", "kind", "n", *names], rows, set(range(2, len(names) + 3)))])


# --------------------------------------------------------------------------------------------
# assembling
# --------------------------------------------------------------------------------------------


def build_report(run_dir: str) -> str:
    """The report of ``run_dir`` as one HTML document (a string)."""
    import yaml

    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.config import config_from_dict
    from compeffdist_ray.pipeline import CONFIG_FILE, stage_statuses

    rd = RunDir(run_dir)
    text = rd.read_text(CONFIG_FILE)
    if text is None:
        raise UserError(f"{run_dir} has no {CONFIG_FILE}: not a run directory; give the folder `compeffdist run` wrote")
    cfg = config_from_dict(yaml.safe_load(text) or {})
    statuses = stage_statuses(rd, cfg)
    teacher = cfg.teacher.model if not cfg.responses.file else f"answers from {cfg.responses.file}"
    sections = [_stages_section(statuses), _perspectives_section(rd), _examples_section(rd), _difficulty_section(rd),
                _sampling_section(rd), _training_section(rd), _evaluation_section(rd)]
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>compeffdist run report: {_e(rd.uri)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>compeffdist run report</h1><p class=\"meta\"><code>{_e(rd.uri)}</code> · teacher <b>{_e(teacher)}</b> · "
        f"student <b>{_e(cfg.student.model)}</b> · {'proxy mode · ' if cfg.filtering.proxy.enabled else ''}"
        f"written {created}</p>",
        *[s for s in sections if s],
        f"<details><summary>config.yaml</summary><pre>{_e(text)}</pre></details>",
        "</main></body></html>",
    ])


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write the report (default ``<run_dir>/report.html``); returns where it went."""
    from compeffdist_ray.artifacts import RunDir

    page = build_report(run_dir)
    if out is None:
        rd = RunDir(run_dir)
        rd.write_text(REPORT_FILE, page)
        return rd.path(REPORT_FILE)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out

