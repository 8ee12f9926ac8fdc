"""The report view's pages: plain HTML with an inline SVG chart, made on the server.

No script, no font or style sheet from elsewhere: the pages load nothing but themselves (the
api-server's Content-Security-Policy for them says so). Every value from a report goes through
``html.escape`` (``_e``), attribute values included.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import quote

from retention.airflow.run_reports import COLUMNS, Kind, RunReport, note_for

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1c2733;background:#f6f8fa}
main{max-width:1180px;margin:0 auto;padding:20px 28px 40px}
h1{font-size:22px;margin:4px 0 14px} h2{font-size:17px;margin:26px 0 8px} h3{font-size:15px;margin:16px 0 6px}
a{color:#0b5cad} nav.crumbs{font-size:13px;margin-bottom:6px;color:#555}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;min-width:50%}
th,td{border:1px solid #d4dae1;padding:5px 9px;text-align:left;vertical-align:top}
th{background:#eef2f6;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
td.zero{color:#9aa5b1} .reason{font-size:12.5px;color:#444}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;white-space:nowrap}
.success,.passed{background:#dff3e4;color:#14532d} .failed{background:#fde2e1;color:#7f1d1d}
.dry{background:#fff4ce;color:#6b4e00} .real{background:#dbeafe;color:#1e3a8a} .other{background:#eceff3;color:#333}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:4px 16px;background:#fff;border:1px solid #d4dae1;padding:10px 14px;max-width:760px}
dl.facts dt{font-weight:600} dl.facts dd{margin:0}
.chart{background:#fff;border:1px solid #d4dae1;padding:8px;display:inline-block}
.muted{color:#6b7785;font-size:12.5px} .guard-failed{color:#7f1d1d;font-weight:600}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def run_href(base: str, r: RunReport) -> str:
    return f"{base}runs/{quote(r.dag_id, safe='')}/{quote(r.run_id, safe='')}"


def page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body><main>{body}</main></body></html>"
    )


def _state(state: str) -> str:
    cls = state if state in ("success", "failed") else "other"
    return f"<span class='badge {cls}'>{_e(state)}</span>"


def _mode(r: RunReport) -> str:
    if r.kind is Kind.PREVIEW:
        return "<span class='badge dry'>PREVIEW</span>"
    return "<span class='badge dry'>DRY RUN</span>" if r.dry_run else "<span class='badge real'>erasing</span>"


def when(iso: str | None) -> str:
    """``2026-12-02T17:50:19.154086+00:00`` as ``2026-12-02 17:50:19 UTC`` (as written otherwise)."""
    if not iso:
        return ""
    try:
        moment = datetime.fromisoformat(iso).astimezone(UTC)
    except ValueError:
        return iso
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _nice(peak: float) -> float:
    """The chart's top: the peak rounded up to 1, 2, 2.5 or 5 times a power of ten."""
    scale = 10 ** math.floor(math.log10(peak))
    return next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= peak)


def _validation_cell(r: RunReport) -> str:
    if not r.validations:
        return "<span class='muted'>—</span>"
    return " ".join(f"{_e(v.system)}: {_outcome(v.outcome)}" for v in r.validations)


def _outcome(outcome: str) -> str:
    good = outcome in ("passed", "within the guard")
    return f"<span class='badge {'passed' if good else 'failed'}'>{_e(outcome)}</span>"


# --------------------------------------------------------------------------- the chart
PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#0891b2", "#dc2626", "#4d7c0f", "#be185d", "#475569", "#a16207")


def chart(runs: Sequence[RunReport], title: str) -> str:
    """Erasures per rule (stacked bars) and the due backlog (line) over ``runs``, oldest first."""
    runs = list(runs)
    if not runs:
        return "<p class='muted'>No runs yet.</p>"
    rules = sorted({rule for r in runs for rule in r.erased_by_rule()})
    colour = {rule: PALETTE[i % len(PALETTE)] for i, rule in enumerate(rules)}
    width, height, left, right, top, bottom = 860, 330, 56, 16, 30, 96
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = _nice(max([sum(r.erased_by_rule().values()) for r in runs] + [r.due or 0 for r in runs] + [1]))
    step = plot_w / len(runs)
    bar = max(4.0, min(40.0, step * 0.6))

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / peak

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 10 + 22 * ((len(rules) + 3) // 4)}' "
        f"role='img' aria-labelledby='chart-title' class='history-chart'>",
        f"<title id='chart-title'>{_e(title)}</title>",
        f"<text x='{left}' y='18' font-size='13' font-weight='600' fill='#1c2733'>{_e(title)}</text>",
    ]
    for frac in (0, 0.2, 0.4, 0.6, 0.8, 1):
        v = peak * frac
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{y(v):.1f}' y2='{y(v):.1f}' stroke='#e3e8ee'/>")
        out.append(f"<text x='{left - 6}' y='{y(v) + 4:.1f}' font-size='11' text-anchor='end' fill='#555'>{v:g}</text>")
    points = []
    for i, r in enumerate(runs):
        cx = left + step * (i + 0.5)
        base = 0
        for rule, n in sorted(r.erased_by_rule().items()):
            out.append(
                f"<rect class='bar' x='{cx - bar / 2:.1f}' y='{y(base + n):.1f}' width='{bar:.1f}' height='{y(base) - y(base + n):.1f}' "
                f"fill='{colour[rule]}'><title>{_e(r.run_id)}: {_e(rule)} erased {n}</title></rect>"
            )
            base += n
        if r.due is not None:
            points.append((cx, y(r.due), r))
        label = ("D " if r.dry_run else "") + (when(r.as_of)[:16] if r.as_of else r.run_id[:16])
        out.append(
            f"<text x='{cx:.1f}' y='{top + plot_h + 14}' font-size='10' text-anchor='end' fill='#555' "
            f"transform='rotate(-35 {cx:.1f} {top + plot_h + 14})'>{_e(label)}</text>"
        )
    if points:
        path = " ".join(f"{x:.1f},{yy:.1f}" for x, yy, _ in points)
        out.append(f"<polyline class='backlog' points='{path}' fill='none' stroke='#111827' stroke-width='2' stroke-dasharray='5 3'/>")
        for x, yy, r in points:
            out.append(f"<circle cx='{x:.1f}' cy='{yy:.1f}' r='3.5' fill='#111827'><title>{_e(r.run_id)}: due {r.due}</title></circle>")
    ly = height + 4
    legend = [("due backlog (records due)", None)] + [(f"erased: {rule}", colour[rule]) for rule in rules]
    for i, (name, fill) in enumerate(legend):
        lx, row = left + (i % 4) * 200, ly + 22 * (i // 4) - 14
        if fill is None:
            out.append(f"<line x1='{lx}' x2='{lx + 16}' y1='{row + 6}' y2='{row + 6}' stroke='#111827' stroke-width='2' stroke-dasharray='5 3'/>")
        else:
            out.append(f"<rect x='{lx}' y='{row}' width='14' height='12' fill='{fill}'/>")
        out.append(f"<text x='{lx + 20}' y='{row + 10}' font-size='11.5' fill='#1c2733'>{_e(name)}</text>")
    out.append("</svg>")
    return "".join(out) + "<p class='muted'>Bars: records erased or minimised per rule. Dashed line: records due (planned) in that run. D: a dry run (nothing erased).</p>"


# --------------------------------------------------------------------------- the pages
def list_page(base: str, runs: Sequence[RunReport], history: Sequence[RunReport], dag_id: str | None, dags: Sequence[str], n: int) -> str:
    title = f"{history[0].dag_id if history else dag_id or 'retention_nightly'}: erasures per rule and due backlog, last {n} runs"
    links = " · ".join(
        f"<a href='{_e(base)}?dag_id={_e(quote(d, safe=''))}'>{_e(d)}</a>" for d in dags
    )
    body = [
        "<h1>Retention run reports</h1>",
        f"<p class='muted'>Counts and pseudonyms only. DAGs: <a href='{_e(base)}'>all</a>{' · ' + links if links else ''}</p>",
        "<h2>History</h2>",
        f"<div class='chart'>{chart(history, title)}</div>",
        f"<h2>Runs{' of ' + _e(dag_id) if dag_id else ''}</h2>",
    ]
    if not runs:
        body.append("<p>No reports yet: a run writes its report when it ends.</p>")
    else:
        body.append(
            "<table class='runs'><thead><tr><th>DAG</th><th>run</th><th>state</th><th>mode</th><th>as of</th>"
            "<th>policy</th><th>counts</th><th>validation</th></tr></thead><tbody>"
        )
        for r in runs:
            body.append(
                f"<tr><td>{_e(r.dag_id)}</td><td><a href='{_e(run_href(base, r))}'>{_e(r.run_id)}</a></td><td>{_state(r.state)}</td>"
                f"<td>{_mode(r)}</td><td>{_e(when(r.as_of))}</td><td>{_e(r.policy)}</td><td>{_e(note_for(r))}</td><td>{_validation_cell(r)}</td></tr>"
            )
        body.append("</tbody></table>")
    return page("Retention run reports", "".join(body))


def _counts_table(r: RunReport) -> str:
    columns = [c for c in COLUMNS if any(row.counts.get(c) for row in r.rows)]
    if not r.rows:
        return "<p>Nothing due: no record was planned, held, deferred or quarantined.</p>"
    what = "record type" if r.kind in (Kind.REQUEST, Kind.REPLAY) else "rule"
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    out = [f"<table class='counts'><thead><tr><th>system</th><th>{what}</th>{head}<th>reason</th></tr></thead><tbody>"]
    for row in r.rows:
        cells = "".join(
            f"<td class='n{'' if row.counts.get(c) else ' zero'}'>{row.counts.get(c, 0)}</td>" for c in columns
        )
        out.append(
            f"<tr><td>{_e(row.system)}</td><td>{_e(row.rule)}</td>{cells}<td class='reason'>{_e('; '.join(row.reasons))}</td></tr>"
        )
    totals = r.totals()
    out.append("<tr><th colspan='2'>total</th>" + "".join(f"<th class='n'>{totals.get(c, 0)}</th>" for c in columns) + "<th></th></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _validation_section(r: RunReport, base: str) -> str:
    if not r.validations:
        return ""
    out = ["<h2>Validation</h2><table class='validation'><thead><tr><th>system</th><th>outcome</th><th>plan guard</th>"
           "<th>failed expectations</th><th>Data Docs</th></tr></thead><tbody>"]
    for v in r.validations:
        g = v.guard
        if g and "planned" in g:
            text = f"{g.get('planned')} planned, {g.get('allowed')} allowed of {g.get('extracted')} extracted (max share {g.get('max_share')})"
            guard = f"<span class='{'guard-failed' if not g.get('success', True) else ''}'>{_e(text)}</span>"
        elif g:
            guard = _e(f"new plan {100 * float(g.get('new_share') or 0):.1f}% of the extract, guard {100 * float(g.get('max_share') or 0):.0f}%")
        else:
            guard = "<span class='muted'>—</span>"
        failed = "<br>".join(
            _e(f"{f.get('suite')}: {f.get('expectation')}" + (f" on {f['column']}" if f.get("column") else "")
               + (f": {f['unexpected_count']} rows" if f.get("unexpected_count") is not None else ""))
            for f in v.failed
        ) or "<span class='muted'>none</span>"
        docs = r.data_docs.get(v.system)
        link = f"<a href='{_e(base)}data_docs/{_e(quote(docs))}'>Data Docs</a>" if docs else "<span class='muted'>—</span>"
        out.append(
            f"<tr><td>{_e(v.system)}</td><td>{_outcome(v.outcome)}</td>"
            f"<td>{guard}</td><td>{failed}</td><td>{link}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _carried_over(r: RunReport) -> str:
    c = r.carried_over
    if not c:
        return ""
    if isinstance(c, dict):
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in c.items())
        return f"<h2>Carried-over work</h2><table class='carried'><tbody>{rows}</tbody></table>"
    if isinstance(c, list):
        return "<h2>Carried-over work</h2><ul>" + "".join(f"<li>{_e(x)}</li>" for x in c) + "</ul>"
    return f"<h2>Carried-over work</h2><p>{_e(c)}</p>"


def run_page(base: str, r: RunReport, history: Sequence[RunReport], note: str) -> str:
    facts = [
        ("DAG", _e(r.dag_id)), ("run", _e(r.run_id)), ("kind", _e(r.kind)), ("state", _state(r.state)),
        ("mode", _mode(r)), ("as of", _e(when(r.as_of) or "—")), ("policy version", _e(r.policy or "—")),
        ("note in Airflow", _e(note)),
    ] + [("", _e(n)) for n in r.notes]
    docs_without_validation = {s: p for s, p in r.data_docs.items() if s not in {v.system for v in r.validations}}
    body = [
        f"<nav class='crumbs'><a href='{_e(base)}'>All runs</a> › <a href='{_e(base)}?dag_id={_e(quote(r.dag_id, safe=''))}'>{_e(r.dag_id)}</a></nav>",
        f"<h1>{_e(r.dag_id)} · {_e(r.run_id)}</h1>",
        "<dl class='facts'>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts) + "</dl>",
        f"<h2>Counts per system and {'record type' if r.kind in (Kind.REQUEST, Kind.REPLAY) else 'rule'}</h2>",
        _counts_table(r),
        _validation_section(r, base),
        _carried_over(r),
    ]
    if docs_without_validation:
        body.append("<h2>Data Docs</h2><ul>" + "".join(
            f"<li><a href='{_e(base)}data_docs/{_e(quote(p))}'>{_e(s)}</a></li>" for s, p in docs_without_validation.items()
        ) + "</ul>")
    body.append(f"<h2>History of {_e(r.dag_id)}</h2><div class='chart'>{chart(history, f'{r.dag_id}: erasures per rule and due backlog, runs up to this one')}</div>")
    return page(f"{r.dag_id} {r.run_id}", "".join(body))


def message_page(title: str, text: str, link: tuple[str, str] | None = None) -> str:
    extra = f"<p><a href='{_e(link[0])}'>{_e(link[1])}</a></p>" if link else ""
    return page(title, f"<h1>{_e(title)}</h1><p>{_e(text)}</p>{extra}")
