"""Assemble ``index.html`` (self-contained: inline CSS, inline base64 PNG figures, no JS) from the run state."""

from __future__ import annotations

import html
import math

from . import figures

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f4f4f4}.holds{color:#17751d;font-weight:600}.does-not-hold{color:#b3261e;font-weight:600}
.inconclusive{color:#8a6d00;font-weight:600}img.fig{max-width:100%;border:1px solid #eee;margin:.4em 0;display:block}
code,pre{background:#f6f6f6}pre{padding:.5em;overflow-x:auto;font-size:.8em}.note{color:#555;font-size:.9em}
"""


def _f(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.4g}"
    return html.escape(str(x))


def rows_table(header: list, rows: list) -> str:
    """An HTML table with the given header and rows (cells formatted by ``_f``, so escaped)."""
    head = "".join(f"<th>{_f(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_f(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def interval_table(intervals: list, n: int = 12) -> str:
    """Prediction 3's validity intervals of the first ``n`` rays (the rest counted in one row)."""
    rows = [[i, v.get("class_name"), v["lo"], v["hi"]] for i, v in enumerate(intervals[:n])]
    if len(intervals) > n:
        rows.append([f"{len(intervals) - n} more rays", "", "", ""])
    return rows_table(["ray", "class at alpha=1", "interval lo", "interval hi"], rows)


def tolerance_text(tolerance: dict | None) -> str:
    """A path batch's tolerance as 'key=value' pairs ('not recorded' when there is none)."""
    return ", ".join(f"{k}={v}" for k, v in (tolerance or {}).items()) or "not recorded"


def summary_html(title: str, facts: dict, *tables: str, notes=()) -> str:
    """A result's notebook view: a bold title, a two-column table of facts, further tables and notes."""
    facts_rows = "".join(f"<tr><th>{_f(k)}</th><td>{_f(v)}</td></tr>" for k, v in facts.items())
    note_items = "".join(f"<li>{_f(n)}</li>" for n in notes)
    return (f"<div><p><b>{_f(title)}</b></p><table>{facts_rows}</table>{''.join(tables)}"
            + (f"<ul>{note_items}</ul>" if note_items else "") + "</div>")


def _verdict(v: str) -> str:
    return f'<span class="{v.replace(" ", "-")}">{html.escape(v)}</span>'


def entries_table(entries: list, level: float = 0.95) -> str:
    """The rows of a prediction's statistics: value, baseline, ``level`` interval of the difference (stability's:
    the spread of per-round differences, marked), verdict and, where there is none, why."""
    head = ("<tr><th>model</th><th>data</th><th>statistic</th><th>value</th><th>baseline</th>"
            f"<th>{level:.0%} interval of difference</th><th>verdict</th></tr>")

    def interval(e):
        spread = " (spread)" if str(e.get("ci_method", "")).startswith("spread") else ""
        return f"[{_f(e['ci'][0])}, {_f(e['ci'][1])}]{spread}"

    rows = "".join(f"<tr><td>{_f(e['model'])}</td><td>{_f(e.get('data'))}</td><td>{_f(e['statistic'])}</td>"
                   f"<td>{_f(e['value'])}</td><td>{_f(e['baseline'])}</td><td>{interval(e)}</td>"
                   f"<td>{_verdict(e['verdict'])}" + (f" ({_f(e['degenerate'])})" if e.get("degenerate") else "")
                   + "</td></tr>" for e in entries)
    return f"<table>{head}{rows}</table>"


def cluster_table(clusters: list, n: int = 12, n_units: int = 4) -> str:
    """Dashboard rows of the largest code clusters: size, majority label and share, the bits that set it apart."""
    rows, clusters = [], [c for c in clusters if not c.get("noise")]
    for c in clusters[:n]:
        units = "; ".join(f"{u['site'] or ''}[{u['unit']}] bit {u['bit']}: {u['p_in']:.2f} vs {u['p_out']:.2f}"
                          for u in c.get("units", [])[:n_units])
        share = c.get("majority_share")
        rows.append(f"<tr><td>#{c['cluster']}</td><td>{c['size']}</td><td>{_f(c.get('majority'))}"
                    f"{'' if share is None else f' ({share:.0%})'}</td><td>{_f(units)}</td></tr>")
    if not rows:
        return ""
    if len(clusters) > n:
        rows.append(f"<tr><td>{len(clusters) - n} more clusters</td><td>{sum(c['size'] for c in clusters[n:])}</td>"
                    "<td></td><td></td></tr>")
    return ("<table><tr><th>code cluster</th><th>size</th><th>majority label</th><th>defining units (site[unit] "
            "bit: share of members with the bit set vs of other rows)</th></tr>" + "".join(rows) + "</table>")


def _png(ax) -> str:
    return figures.png(ax.figure)


def _img(b64: str, alt: str) -> str:
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _section(sid: str, title: str, results: list) -> tuple[list, list]:
    """A prediction's section opened: its heading and the table of every model's entries (returned too)."""
    entries = [dict(e, data=r["data"]) for r in results for e in r["entries"]]
    return [f"<section id='{sid}'><h2>{title}</h2>"] + ([entries_table(entries)] if entries else []), entries


def render_report(state: dict) -> str:
    """HTML text of the report from the reproduce state (see ``reproduce``)."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>polytope-lens reproduction</title>"
             f"<style>{_CSS}</style></head><body><h1>polytope-lens: reproduction of the paper's predictions</h1>"
             f"<p class='note'>{html.escape(state.get('subtitle', ''))}</p>"]
    # summary
    rows = []
    for key, label in (("p1", "1: polytopes are monosemantic"), ("p2", "2: density tracks semantic boundaries"),
                       ("p3", "3: boundaries bound validity")):
        for r in state.get(key, []):
            e = next((x for x in r["entries"] if x["statistic"] == r.get("primary")), r["entries"][0])
            rows.append(f"<tr><td>{label}</td><td>{_f(r['model'])} on {_f(r['data'])}</td><td>{_f(e['statistic'])}</td>"
                        f"<td>{_f(e['value'])}</td><td>{_f(e['baseline'])}</td>"
                        f"<td>[{_f(e['ci'][0])}, {_f(e['ci'][1])}]</td><td>{_verdict(e['verdict'])}</td>"
                        f"<td>{'exact' if r.get('exact') else 'approximate'}</td></tr>")
    parts.append("<section id='summary'><h2>Summary</h2><p>One verdict per prediction per model, from its primary "
                 "statistic: <b>holds</b> when the value beats the baseline and the whole 95% CI of the "
                 "difference is above 0, <b>does not hold</b> when the whole CI is below 0, else "
                 "<b>inconclusive</b> (CIs: a paired percentile bootstrap over items for prediction 1, t intervals of "
                 "the mean difference over paths or rays for predictions 2 and 3).</p>"
                 "<table><tr><th>prediction</th><th>model</th><th>statistic</th>"
                 "<th>value</th><th>baseline</th><th>95% interval of difference</th><th>verdict</th>"
                 "<th>counts</th></tr>"
                 + "".join(rows) + "</table></section>")
    # prediction 1
    p1 = state.get("p1", [])
    sec, all_e = _section("prediction-1", "Prediction 1: spline-code clusters vs activation clusters", p1)
    if all_e:
        sec.append(_img(_png(figures.entries_figure(all_e, "Prediction 1: codes - activations", detached=True)),
                        "prediction 1 CIs"))
    for r in p1:
        sec.append(f"<h3>{_f(r['model'])} on {_f(r['data'])}</h3>")
        grid = state.get("grids", {}).get(f"{r['model']} on {r['data']}")
        if grid:
            sec.append("<p>Code clusters (one row per cluster, most confident members):</p>" + _img(grid, "grid"))
        sec.append(cluster_table(r.get("code_clusters", [])))
        ctx = [c for c in r.get("code_clusters", []) if "contexts" in c][:6]
        for c in ctx:
            items = "".join(f"<li><code>{html.escape(t)}</code></li>" for t in c["contexts"][:5])
            sec.append(f"<p>cluster #{c['cluster']} (n={c['size']}, majority {html.escape(str(c['majority']))})</p>"
                       f"<ul>{items}</ul>")
    sec.append("</section>")
    parts.append("".join(sec))
    # prediction 2
    p2 = state.get("p2", [])
    sec, _ = _section("prediction-2", "Prediction 2: boundary density along interpolation paths", p2)
    for r in p2:
        sec.append(f"<h3>{_f(r['model'])} on {_f(r['data'])} (paths at {_f(r['layer'] or 'input')}, "
                   f"{r['method']})</h3>")
        sec.append(_img(_png(figures.crossings_histogram(r, detached=True)), "crossings histogram"))
        sec.append(_img(_png(figures.density_vs_t(r, detached=True)), "density vs t"))
    if state.get("slice"):
        sec.append("<h3>The polytope picture: exact 2-D regions of a toy classifier after each layer</h3>"
                   "<p class='note'>A 2-32-32-32-2 ReLU MLP trained here on two moons; regions coloured by a hash of "
                   "their code, the last panel by class with the decision boundary. Counts are exact.</p>"
                   + _img(state["slice"], "opening slice picture"))
    sec.append("</section>")
    parts.append("".join(sec))
    # prediction 3
    p3 = state.get("p3", [])
    sec, _ = _section("prediction-3", "Prediction 3: scaling and validity intervals", p3)
    for r in p3:
        sec.append(f"<h3>{_f(r['model'])} on {_f(r['data'])} (scaling {_f(r['layer'])}, "
                   f"alpha in {r['settings']['alphas']})</h3>")
        sec.append(_img(figures.png(figures.scaling_figure(r, detached=True)[0].figure), "scaling"))
        sec.append(interval_table(r["intervals"]) + "<p class='note'>— : the class does not change on that side "
                   "within the range.</p>")
    sec.append("</section>")
    parts.append("".join(sec))
    # flow
    sec = ["<section id='flow'><h2>Representational flow</h2><p>Regions visited per layer along the "
           "different-class paths of prediction 2, named by a hash. A region is the site's spline code (from the "
           "codes at each path's start); where a site's row says <i>changed units</i> (text models' sampled paths), "
           "it is the pieces of the units changed since the path's start, so regions are not shared between paths "
           "and a region re-entered counts again.</p>"]
    for model, fl in state.get("flow", {}).items():
        rows = "".join(
            f"<tr><td>{_f(site)}</td><td>{_f(v.get('region', ''))}</td><td>{_f(v['regions_per_path_mean'])}</td>"
            f"<td>{v['regions_per_path_max']}</td>"
            f"<td>{v['distinct_regions']}</td><td>{v['revisits']}</td><td>"
            + ", ".join(f"{t['from']}→{t['to']} ×{t['count']}" for t in v["top_transitions"][:3]) + "</td></tr>"
            for site, v in fl.items())
        sec.append(f"<h3>{_f(model)}</h3><table><tr><th>site</th><th>region</th><th>regions per path (mean)</th>"
                   "<th>max</th>"
                   f"<th>distinct regions</th><th>repeated transitions</th><th>most frequent transitions</th></tr>"
                   f"{rows}</table>")
    sec.append("</section>")
    parts.append("".join(sec))
    # methods
    m = state.get("methods", {})
    parts.append("<section id='methods'><h2>Methods</h2>" + "".join(
        f"<h3>{html.escape(k)}</h3><pre>{html.escape(v if isinstance(v, str) else _pretty(v))}</pre>"
        for k, v in m.items()) + "</section></body></html>")
    return "".join(parts)


def _pretty(v) -> str:
    import json

    return json.dumps(v, indent=1, default=str)
