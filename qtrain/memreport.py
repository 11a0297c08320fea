"""The memory report of profiled training steps: measured timeline beside the analytic estimate.

    write_report(out_dir, profiler.samples(), estimate(...), {"title": ..., "model": ...})

writes into `out_dir`:

    memory.json            info, the measured peak and its breakdown, the estimate, every sample
    memory_timeline.png    categories stacked at each mark, the peak of each interval, phases, steps
    memory_breakdown.png   estimate and measurement at the peak, stacked by category
    memory_report.md       tables and notes, the PNGs linked
    memory_report.html     the same, self-contained (PNGs inlined): one file to send around

Definitions. A sample is taken at a mark; its `peak` is the most allocated in the interval that
the previous mark opens and this one closes. That interval belongs to the step and phase of the
mark that opens it (the phase of a mark is what starts there), and is named "<previous label> →
<label>". The measured peak is the largest such `peak`. Its breakdown is the closing mark's
categories (weights, adapters, gradients, optimizer, activations, other: these sum to `current`)
plus `transient` = peak − current: bytes allocated and freed again inside the interval (the
temporaries of what ran there). Categories + transient = the peak.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path

from qtrain.estimate import Estimate
from qtrain.memprof import CATEGORIES, Sample
from qtrain.rundir import atomic_write_text

GiB, MiB = 2**30, 2**20
PHASES = ("forward", "backward", "optimizer")
COLORS = {
    "weights": "#4C72B0",
    "adapters": "#55A868",
    "gradients": "#C44E52",
    "optimizer": "#8172B2",
    "activations": "#DD8452",
    "other": "#937860",
    "transient": "#CCCCCC",
}
PHASE_COLORS = {"forward": "#DCEBFA", "backward": "#FBE3E1", "optimizer": "#E2F3E2"}
TIMELINE, BREAKDOWN = "memory_timeline.png", "memory_breakdown.png"
NOTES = [
    (
        "Measured: bytes in torch's allocator — torch.cuda.memory_allocated / max_memory_allocated "
        "(reset at each mark) on CUDA; the allocator events of the torch profiler on CPU. "
        "`peak` is the most allocated between two marks; the breakdown at the peak is the categories "
        "at the mark closing that interval plus `transient` (peak − allocated at that mark: "
        "temporaries freed inside the interval)."
    ),
    (
        "Estimate: the analytic model of qtrain.estimate at its worst moment. Its `peak` is comparable "
        "to the measured peak; its `other` corresponds to measured other + transient. The GPU total "
        "(device_total) adds the CUDA context and the caching allocator's slack, which the allocator "
        "counters do not see (compare it with nvidia-smi, not with the peak)."
    ),
    (
        "Paged optimizer state (bitsandbytes paged_adamw_*) lives in CUDA unified memory, outside "
        "torch's allocator: it is listed apart and is in neither peak."
    ),
    (
        "Ratio = estimate / measured: above 1 the estimate is on the safe side (it over-estimates), below 1 it "
        "under-estimates. Each phase's measured peak is compared with the estimate's moment in that phase (loss "
        "forward: forward; loss backward, a layer's backward: backward; optimizer step: optimizer); a phase whose "
        "measured peak exceeds that estimate by more than 10% is flagged as under-estimated."
    ),
]
UNDER_ESTIMATE_TOLERANCE = 0.10  # a phase is flagged when its measured peak is more than 10% above its estimate


def fmt_bytes(n: float, unit: str | None = None) -> str:
    """Bytes as "1.23 GiB" (or MiB): `unit` fixed, or GiB from 1 GiB up and MiB below."""
    unit = unit or ("GiB" if abs(n) >= GiB else "MiB")
    return f"{n / (GiB if unit == 'GiB' else MiB):.2f} {unit}"


def _signed(n: float, unit: str) -> str:
    """A difference: "+0.25 GiB", "-0.25 GiB", "0.00 GiB" (no sign on what rounds to zero)."""
    text = fmt_bytes(n, unit)
    if float(text.split()[0]) == 0:
        return fmt_bytes(0, unit)
    return ("+" if n > 0 else "") + text


# ---- the numbers ----


def interval(samples: list[Sample], i: int) -> tuple[Sample, str]:
    """The mark opening the interval sample i closes (itself for the first), and the interval's name."""
    if i == 0:
        return samples[0], f"start → {samples[0].label}"
    return samples[i - 1], f"{samples[i - 1].label} → {samples[i].label}"


def phase_peaks(samples: list[Sample]) -> dict[str, int]:
    """The highest interval peak of each phase (the phase of the mark opening the interval)."""
    return {phase: samples[i].peak for phase, i in phase_peak_intervals(samples).items()}


def phase_peak_intervals(samples: list[Sample]) -> dict[str, int]:
    """The index of the sample closing each phase's highest interval (the first, on ties)."""
    out: dict[str, int] = {}
    for i, s in enumerate(samples):
        phase = interval(samples, i)[0].phase
        if phase not in out or s.peak > samples[out[phase]].peak:
            out[phase] = i
    return out


def measured(samples: list[Sample]) -> dict:
    """The measured peak: its interval, step and phase, its breakdown (summing to the peak), the
    peak of each phase and the most paged optimizer state seen."""
    if not samples:
        raise ValueError("no memory samples: profile at least one training step")
    i = max(range(len(samples)), key=lambda k: samples[k].peak)
    s = samples[i]
    opening, name = interval(samples, i)
    parts = {c: s.parts.get(c, 0) for c in CATEGORIES}
    parts["transient"] = max(s.peak - s.current, 0)
    return {
        "peak_bytes": s.peak,
        "peak_index": i,
        "peak_step": opening.step,
        "peak_label": name,
        "peak_phase": opening.phase,
        "by_category_at_peak": parts,
        "phase_peaks_bytes": phase_peaks(samples),
        "paged_bytes": max(x.paged for x in samples),
        "definition": "the peak interval is the one with the highest `peak`; it belongs to the step and phase of "
        "the mark opening it. by_category_at_peak: the categories at the mark closing it, plus transient = "
        "peak - current there (allocated and freed inside the interval); they sum to peak_bytes.",
    }


def _estimate_phase(name: str) -> str:
    """An estimate moment ("loss forward", "last layer's backward", ...) → a measured phase."""
    return next((p for p in PHASES if p in name), name)


def phase_moments(estimate: Estimate | None, phase: str) -> dict[str, int]:
    """The estimate's moments (name: bytes) that fall in measured phase `phase`."""
    return {k: v for k, v in (estimate.phases if estimate else {}).items() if _estimate_phase(k) == phase}


def compare_phases(samples: list[Sample], estimate: Estimate | None) -> list[dict]:
    """Each measured phase beside the estimate's largest moment in that phase (phases the estimate
    has no moment for are left out): phase, measured_bytes, where (step and interval of the measured
    peak), moment, estimated_bytes, ratio (estimate / measured), underestimated (measured more than
    10% above the estimate)."""
    if estimate is None:
        return []
    out = []
    for phase, i in phase_peak_intervals(samples).items():
        moments = phase_moments(estimate, phase)
        if not moments or not samples[i].peak:
            continue
        moment = max(moments, key=moments.get)
        opening, name = interval(samples, i)
        out.append(
            {
                "phase": phase,
                "measured_bytes": samples[i].peak,
                "where": f"step {opening.step}, {name}",
                "moment": moment,
                "estimated_bytes": moments[moment],
                "ratio": moments[moment] / samples[i].peak,
                "underestimated": samples[i].peak > moments[moment] * (1 + UNDER_ESTIMATE_TOLERANCE),
            }
        )
    return out


def ratio_text(r: float) -> str:
    """"estimate / measured = 0.94: the estimate is 6% below the measurement" (the percentage read off
    the ratio as printed, so that the two agree)."""
    shown = round(r, 2)
    pct = round(abs(shown - 1) * 100)
    if pct == 0:
        return f"estimate / measured = {shown:.2f}: the estimate matches the measurement"
    side = "below the measurement" if shown < 1 else "above the measurement (on the safe side)"
    return f"estimate / measured = {shown:.2f}: the estimate is {pct}% {side}"


def underestimate_text(c: dict) -> str:
    """One flagged phase, for the report and the console."""
    return (
        f"{c['phase']} under-estimated: measured {fmt_bytes(c['measured_bytes'])} ({c['where']}), estimated "
        f"{fmt_bytes(c['estimated_bytes'])} ({c['moment']}); {ratio_text(c['ratio'])}"
    )


def summary_lines(report: str | Path) -> list[str]:
    """For the console, from a written report (its memory_report.html or folder): the overall ratio,
    then one line per under-estimated phase."""
    folder = Path(report) if Path(report).is_dir() else Path(report).parent
    doc = json.loads((folder / "memory.json").read_text())
    if doc.get("ratio_estimate_over_measured") is None:
        return []
    lines = [f"peak: {ratio_text(doc['ratio_estimate_over_measured'])}"]
    return lines + [underestimate_text(c) for c in doc.get("phases_compared", []) if c["underestimated"]]


# ---- the plots ----


def _save(fig, png: Path) -> None:
    """The figure as a PNG, atomically (temp file + rename)."""
    tmp = png.with_name(f".{png.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, png)


def _scale(peak: int) -> tuple[str, int]:
    return ("GiB", GiB) if peak >= GiB else ("MiB", MiB)


def _phase_runs(samples: list[Sample]) -> list[tuple[int, int, str]]:
    """(first mark, last mark + 1, phase) of each run of marks opening intervals of one phase."""
    runs: list[tuple[int, int, str]] = []
    for i, s in enumerate(samples):
        if runs and runs[-1][2] == s.phase and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1, s.phase)
        else:
            runs.append((i, i + 1, s.phase))
    return runs


def timeline_figure(samples: list[Sample], estimate: Estimate | None, title: str):
    """Categories stacked at each mark, the peak of each interval (a step line), phases as bands,
    step boundaries, the estimate's peak dashed, the measured peak annotated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = measured(samples)
    unit, scale = _scale(max(m["peak_bytes"], estimate.peak if estimate else 0))
    x = list(range(len(samples)))
    fig = Figure(figsize=(12, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    last = len(samples) - 1
    for a, b, phase in _phase_runs(samples):
        ax.axvspan(a, min(b, last), color=PHASE_COLORS.get(phase, "#EEEEEE"), zorder=0, lw=0)
    stacks = [[s.parts.get(c, 0) / scale for s in samples] for c in CATEGORIES]
    ax.stackplot(x, *stacks, labels=CATEGORIES, colors=[COLORS[c] for c in CATEGORIES], alpha=0.85, zorder=1)
    peaks = [s.peak / scale for s in samples]  # each over the interval that ends at its mark
    ax.step(x, peaks, where="pre", color="black", lw=1.3, label="peak in interval", zorder=3)
    for i in [0] + [i for i in x[1:] if samples[i].step != samples[i - 1].step]:  # each step's first mark
        if i:
            ax.axvline(i, color="0.3", ls=":", lw=1, zorder=2)
        ax.text(i, 1.01, f" step {samples[i].step}", transform=ax.get_xaxis_transform(), fontsize=8, va="bottom")
    if estimate is not None:
        label = f"estimate ({estimate.phase})"
        ax.axhline(estimate.peak / scale, color="crimson", ls="--", lw=1.3, label=label, zorder=3)
    k, peak = m["peak_index"], m["peak_bytes"] / scale
    ax.annotate(
        f"measured peak {fmt_bytes(m['peak_bytes'], unit)}\n{m['peak_label']}",
        xy=(max(k - 0.5, 0), peak), xytext=(max(k - 0.5, 0), 0.97), textcoords=("data", "axes fraction"),
        ha="right" if k > len(x) / 2 else "left", va="top", fontsize=8, arrowprops={"arrowstyle": "->", "lw": 0.8},
        bbox={"boxstyle": "round", "fc": "white", "alpha": 0.9},
    )  # fmt: skip
    ax.set_ylim(0, max(peak, estimate.peak / scale if estimate else 0) * 1.3 or 1)
    ax.set_xlim(0, max(last, 1))
    _ticks(ax, samples)
    ax.set_ylabel(f"allocated ({unit})")
    ax.set_title(title, pad=16)
    _timeline_legend(ax, samples)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def _timeline_legend(ax, samples: list[Sample]) -> None:
    """Outside, right: the lines, the categories top to bottom as stacked, the phases."""
    from matplotlib.patches import Patch

    by_label = dict(zip(*ax.get_legend_handles_labels()[::-1]))
    labels = [k for k in by_label if k not in CATEGORIES] + [c for c in CATEGORIES[::-1] if c in by_label]
    handles = [by_label[k] for k in labels]
    for p in (p for p in PHASE_COLORS if any(s.phase == p for s in samples)):
        handles.append(Patch(color=PHASE_COLORS[p]))
        labels.append(f"{p} phase")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)


def _ticks(ax, samples: list[Sample]) -> None:
    if len(samples) <= 60:  # few marks: name each one
        ax.set_xticks(range(len(samples)), [s.label for s in samples], rotation=90, fontsize=7)
        ax.set_xlabel("mark (what starts there)")
    else:
        ax.set_xlabel("mark")


def breakdown_figure(samples: list[Sample], estimate: Estimate | None, title: str):
    """Stacked bars at the peak: the estimate's categories beside the measured ones."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = measured(samples)
    bars = {"estimate": estimate.by_category()} if estimate is not None else {}
    bars["measured"] = m["by_category_at_peak"]
    unit, scale = _scale(max(sum(b.values()) for b in bars.values()))
    fig = Figure(figsize=(6.5, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for x, (name, parts) in enumerate(bars.items()):
        bottom = 0.0
        for c in (*CATEGORIES, "transient"):
            v = parts.get(c, 0) / scale
            if v > 0:
                hatch = "//" if c == "transient" else None
                ax.bar(x, v, 0.55, bottom=bottom, color=COLORS[c], hatch=hatch, edgecolor="white", label=c)
                bottom += v
        ax.text(
            x, bottom, fmt_bytes(sum(parts.values()), unit), ha="center", va="bottom", fontsize=10, fontweight="bold"
        )
    ax.set_xticks(range(len(bars)), list(bars))
    ax.set_xlim(-0.7, len(bars) - 0.3)
    ax.set_ylim(0, max(sum(b.values()) for b in bars.values()) / scale * 1.12 or 1)
    ax.set_ylabel(f"allocated at the peak ({unit})")
    ax.set_title(f"{title}\nat the peak", fontsize=10)
    seen = dict(zip(*ax.get_legend_handles_labels()[::-1]))  # one entry per category
    order = [c for c in (*CATEGORIES, "transient") if c in seen][::-1]
    ax.legend([seen[c] for c in order], order, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


# ---- the document: blocks rendered as Markdown and as HTML ----


def ratio(estimate: Estimate | None, m: dict) -> float | None:
    return estimate.peak / m["peak_bytes"] if estimate is not None and m["peak_bytes"] else None


def _blocks(samples: list[Sample], estimate: Estimate | None, info: dict, m: dict, compared: list[dict]) -> list[tuple]:
    unit = _scale(max(m["peak_bytes"], estimate.peak if estimate else 0))[0]  # one unit for the whole report
    title = str(info.get("title", "qtrain memory report"))
    steps = sorted({s.step for s in samples})
    blocks: list[tuple] = [("h1", title)]
    rows = [[str(k), _value(v)] for k, v in info.items() if k != "title"]
    rows.append(["profiled", f"{len(steps)} step(s) ({', '.join(map(str, steps))}), {len(samples)} marks"])
    blocks.append(("table", ["setting", "value"], rows))
    blocks += _peak_blocks(m, estimate, unit)
    blocks += _category_blocks(m, estimate, unit)
    if estimate is not None:
        rows = [[i.category, i.name, fmt_bytes(i.bytes, unit), i.note] for i in estimate.items]
        blocks += [
            ("h2", f"Estimate at its peak ({estimate.phase})"),
            ("table", ["category", "item", "size", "note"], rows),
        ]
    blocks += _phase_blocks(m, estimate, unit, compared)
    blocks += [("h2", "What the numbers mean"), ("ul", NOTES)]
    blocks += [
        ("h2", "Timeline"),
        ("img", "memory timeline", TIMELINE),
        ("h2", "Breakdown at the peak"),
        ("img", "memory breakdown", BREAKDOWN),
    ]
    return blocks


def _value(v) -> str:
    return "yes" if v is True else "no" if v is False else str(v)


def _peak_blocks(m: dict, estimate: Estimate | None, unit: str) -> list[tuple]:
    def f(n):
        return fmt_bytes(n, unit)

    where = f"step {m['peak_step']}, {m['peak_phase']}: {m['peak_label']}"
    rows = [["measured peak", f(m["peak_bytes"]), where]]
    if estimate is not None:
        r = ratio(estimate, m)
        rows.append(["estimated peak", f(estimate.peak), estimate.phase])
        rows.append(["ratio estimate / measured", f"{r:.2f}" if r is not None else "—", ratio_text(r) if r else ""])
        if estimate.workload is None or estimate.workload.device == "cuda":
            rows.append(["estimated GPU total", f(estimate.device_total), "+ CUDA context and allocator slack"])
    if m["paged_bytes"] or (estimate is not None and estimate.paged):
        rows.append(
            ["paged optimizer state", f(m["paged_bytes"]), f"estimated {f(estimate.paged)}" if estimate else ""]
        )
    if estimate is not None and estimate.host:
        rows.append(["offloaded activations (estimated)", f(estimate.host), "pinned CPU RAM"])
    return [("h2", "Peak"), ("table", ["", "allocated", "where"], rows)]


def _category_blocks(m: dict, estimate: Estimate | None, unit: str) -> list[tuple]:
    def f(n):
        return fmt_bytes(n, unit)

    meas = m["by_category_at_peak"]
    est = estimate.by_category() if estimate is not None else {}
    rows = []
    for c in (*CATEGORIES, "transient", "total"):
        mv = sum(meas.values()) if c == "total" else meas.get(c, 0)
        if estimate is None:
            rows.append([c, f(mv)])
            continue
        ev = sum(est.values()) if c == "total" else est.get(c, 0)
        rows.append([c, f(ev), f(mv), _signed(mv - ev, unit)])
    header = (
        ["category", "estimate", "measured", "measured − estimate"]
        if estimate is not None
        else ["category", "measured"]
    )
    return [("h2", "By category at the peak"), ("table", header, rows)]


def _phase_blocks(m: dict, estimate: Estimate | None, unit: str, compared: list[dict]) -> list[tuple]:
    def f(n):
        return fmt_bytes(n, unit)

    measured_peaks = m["phase_peaks_bytes"]
    checks = {c["phase"]: c for c in compared}
    rows = []
    for phase in dict.fromkeys([*PHASES, *measured_peaks]):
        moments = phase_moments(estimate, phase)
        if phase not in measured_peaks and not moments:
            continue
        mv = measured_peaks.get(phase)
        row = [phase, f(mv) if mv is not None else "—"]
        if estimate is not None:
            top = max(moments, key=moments.get) if moments else None
            row += [f(moments[top]) if top else "—", ", ".join(f"{k} {f(v)}" for k, v in moments.items()) or "—"]
            row.append(_check_cell(checks.get(phase)))
        rows.append(row)
    header = ["phase", "measured peak"]
    header += ["estimated peak", "estimated moments", "estimate / measured"] if estimate is not None else []
    blocks = [("h2", "Peak per phase"), ("table", header, rows)]
    flagged = [underestimate_text(c) for c in compared if c["underestimated"]]
    if flagged:
        pct = round(100 * UNDER_ESTIMATE_TOLERANCE)
        blocks += [("h2", f"Under-estimated phases (measured more than {pct}% above the estimate)"), ("ul", flagged)]
    return blocks


def _check_cell(c: dict | None) -> str:
    if c is None:
        return "—"
    return f"{c['ratio']:.2f}" + (" ⚠ under-estimated" if c["underestimated"] else "")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out.append(f"# {rest[0]}\n")
        elif kind == "h2":
            out.append(f"## {rest[0]}\n")
        elif kind == "ul":
            out.append("".join(f"- {item}\n" for item in rest[0]))
        elif kind == "img":
            out.append(f"![{rest[0]}]({rest[1]})\n")
        elif kind == "table":
            header, rows = rest
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .7em;text-align:left}
th{background:#f4f4f4}tr:nth-child(even) td{background:#fafafa}td:not(:first-child){font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 .2em}li{margin:.3em 0}"""


def _inline(text) -> str:
    """Escaped for HTML, with Markdown's `code` spans kept."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))


def to_html(blocks: list[tuple], images: Path) -> str:
    """Self-contained: the images (read from `images`) inlined as data URIs."""
    e = _inline
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((images / rest[1]).read_bytes()).decode("ascii")
            out.append(f'<p><img alt="{e(rest[0])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    title = e(next((b[1] for b in blocks if b[0] == "h1"), "memory report"))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>\n<style>{CSS}</style></head>\n<body>\n'
        + "\n".join(out)
        + "\n</body></html>\n"
    )


# ---- all of it ----


def write_report(out_dir: Path, samples: list[Sample], estimate: Estimate | None, info: dict) -> Path:
    """Write memory.json, the two PNGs, memory_report.md and memory_report.html into `out_dir`.
    Returns the HTML report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m, compared = measured(samples), compare_phases(samples, estimate)
    doc = {
        "info": info,
        "measured": m,
        "estimate": estimate.to_dict() if estimate is not None else None,
        "ratio_estimate_over_measured": ratio(estimate, m),
        "phases_compared": compared,
        "samples": [s.to_dict() for s in samples],
    }
    atomic_write_text(out_dir / "memory.json", json.dumps(doc, indent=1, default=str) + "\n")
    title = str(info.get("title", "qtrain memory report"))
    _save(timeline_figure(samples, estimate, title), out_dir / TIMELINE)
    _save(breakdown_figure(samples, estimate, title), out_dir / BREAKDOWN)
    blocks = _blocks(samples, estimate, info, m, compared)
    atomic_write_text(out_dir / "memory_report.md", to_markdown(blocks))
    page = out_dir / "memory_report.html"
    atomic_write_text(page, to_html(blocks, out_dir))
    return page
