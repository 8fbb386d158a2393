"""`jobs.report`: the history (`pipeline.ops.history`) as one self-contained HTML page: a table of the last runs, newest
first, and PNG plots inlined as `data:` URIs (matplotlib, Agg): time per stage, the build's phases, bytes written,
rows changed, distortion against its drift limit, segments and tombstones. Full builds, compactions and failed runs
are marked on every plot. No script, no network: the file can be mailed or opened from a bucket as it is.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.ops.history import HistoryRecord, read_history
from pipeline.store.layout import history_report
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)

DEFAULT_LAST = 60
STAGES = ("ingest", "encode", "build_index", "serve", "retain")
STAGE_COLOURS = {
    "ingest": "#4e79a7",
    "encode": "#f28e2b",
    "build_index": "#59a14f",
    "serve": "#b07aa1",
    "retain": "#9c755f",
}
PHASE_ORDER = ("sample", "train", "add", "measure", "tombstone", "compact", "lexical", "publish")
AREA_COLOURS = {"passages": "#4e79a7", "embeddings": "#f28e2b", "index": "#59a14f"}
ROW_COLOURS = {"new": "#59a14f", "changed": "#f1ce63", "deleted": "#e15759"}
MARKS = {  # what is marked on every plot: a shaded band behind the run and a marker above it (colour, marker, legend)
    "full": ("#7b3294", "v", "full build"),
    "compaction": ("#e66101", "D", "compaction"),
    "failed": ("#222222", "X", "failed run"),
}


# -- plots ---------------------------------------------------------------------------------------------------------
def _marks_of(record: HistoryRecord) -> list[str]:
    marks = []
    if record.full_build:
        marks.append("full")
    if record.status == "ok" and (record.kind == "compact" or record.compacted) and record.published is not False:
        marks.append("compaction")
    if record.status == "failed":
        marks.append("failed")
    return marks


def _label(record: HistoryRecord) -> str:
    name = record.snapshot or "?"
    return name if record.kind == "night" else f"{name}\n({record.kind})"


def _human_bytes(value: float, _position: Any = None) -> str:
    """Decimal units (1 MB = 10^6 bytes), as the plots' log-scale ticks fall on powers of ten."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} TB"


class Plotter:
    """One figure per call, every one on the same x positions (the runs, oldest left) with the same marks. Figures
    are sized for two side by side on a laptop screen; their titles are the page's captions."""

    WIDTH, HEIGHT = 6.0, 3.0  # inches at 100 dpi: 600 x 300 pixels

    def __init__(self, records: Sequence[HistoryRecord]):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.records = list(records)
        self.x = list(range(len(self.records)))
        self.legends: dict[str, list[str]] = {}  # each figure's legend, by title (what tests check)
        self.made: list[tuple[str, bytes]] = []  # (title, PNG) of each figure, in order

    def figure(self):
        return self.plt.subplots(figsize=(self.WIDTH, self.HEIGHT), dpi=100)

    def _edges(self, points: list[tuple[int, float]]) -> tuple[list[float], list[float]]:
        """A step line over whole runs: each value held from half a run before its run to half a run after."""
        xs = [x - 0.5 for x, _ in points] + [points[-1][0] + 0.5]
        return xs, [y for _, y in points] + [points[-1][1]]

    @staticmethod
    def _columns(handles: Sequence) -> int:
        """Legend columns: the most that fit the figure's width (~100 characters of 7-point text, a handle and the
        spacing counting 6), filled column by column as matplotlib does."""
        labels = [len(handle.get_label()) for handle in handles]
        for rows in range(1, len(labels) + 1):
            columns = -(-len(labels) // rows)
            widths = [max(labels[c * rows : (c + 1) * rows], default=0) + 6 for c in range(columns)]
            if sum(widths) <= 100:
                return columns
        return 1

    def finish(self, figure, axes, title: str, ylabel: str, extra_handles: Sequence = ()) -> bytes:
        """Marks, the legend (above the plot), labels, ticks; the figure as PNG bytes."""
        from matplotlib.lines import Line2D
        from matplotlib.transforms import blended_transform_factory

        low, high = axes.get_ylim()  # headroom for the marks above the runs
        axes.set_ylim(low, high * 2 if axes.get_yscale() == "log" else high + 0.08 * (high - low))
        above = blended_transform_factory(axes.transData, axes.transAxes)  # x: the run, y: the top of the plot
        present: dict[str, Any] = {}
        for x, record in zip(self.x, self.records):
            marks = _marks_of(record)
            for j, mark in enumerate(marks):
                colour, marker, label = MARKS[mark]
                axes.axvspan(x - 0.5, x + 0.5, color=colour, alpha=0.09, linewidth=0, zorder=0)
                offset = 0.22 * (j - (len(marks) - 1) / 2)
                axes.plot(
                    [x + offset], [1.0], marker=marker, color=colour, markersize=6, linestyle="none",
                    transform=above, clip_on=False, zorder=5,
                )  # fmt: skip
                present[mark] = Line2D([], [], color=colour, marker=marker, markersize=6, linestyle="none", label=label)
        handles, _ = axes.get_legend_handles_labels()
        handles = [*handles, *extra_handles, *(present[m] for m in MARKS if m in present)]
        self.legends[title] = [handle.get_label() for handle in handles]
        if handles:
            axes.legend(
                handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.05), ncol=self._columns(handles),
                fontsize=7, frameon=False, handlelength=1.4, columnspacing=1.0, borderaxespad=0.0,
            )  # fmt: skip
        axes.set_ylabel(ylabel, fontsize=8)
        axes.set_xlim(-0.6, len(self.x) - 0.4)
        step = max(1, -(-len(self.x) // 8))  # at most 8 labels
        ticks = self.x[::-1][::step][::-1]  # the newest run is always labelled
        axes.set_xticks(ticks)
        axes.set_xticklabels([_label(self.records[i]) for i in ticks], fontsize=7)
        axes.tick_params(axis="y", labelsize=7)
        axes.grid(True, axis="y", alpha=0.3)
        axes.spines["top"].set_visible(False)
        figure.tight_layout(pad=0.4)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        self.plt.close(figure)
        self.made.append((title, buffer.getvalue()))
        return buffer.getvalue()

    def _stacked(self, series: dict[str, list[float]], colours: dict[str, Any], width: float = 0.6):
        figure, axes = self.figure()
        bottom = [0.0] * len(self.x)
        for name, values in series.items():
            if any(values):
                axes.bar(self.x, values, width, bottom=bottom, label=name, color=colours.get(name))
                bottom = [b + v for b, v in zip(bottom, values)]
        return figure, axes

    def _grouped(self, series: dict[str, list[float]], colours: dict[str, str], log_scale: bool):
        figure, axes = self.figure()
        width = 0.8 / max(1, len(series))
        for i, (name, values) in enumerate(series.items()):
            offsets = [x - 0.4 + width * (i + 0.5) for x in self.x]
            axes.bar(offsets, [max(v, 0) for v in values], width, label=name, color=colours.get(name))
        positive = [v for values in series.values() for v in values if v > 0]
        if log_scale and positive and max(positive) / min(positive) > 30:
            from matplotlib.ticker import NullFormatter

            axes.set_yscale("log")
            axes.set_ylim(bottom=min(positive) / 2)
            axes.yaxis.set_minor_formatter(NullFormatter())
        return figure, axes

    def stage_seconds(self) -> bytes:
        series = {s: [r.stage_seconds.get(s, 0.0) for r in self.records] for s in STAGES}
        others = sorted({k for r in self.records for k in r.stage_seconds} - set(STAGES))
        series.update({s: [r.stage_seconds.get(s, 0.0) for r in self.records] for s in others})
        figure, axes = self._stacked(series, STAGE_COLOURS)
        title = "Time per stage (serve: moving the Serve app; a build or compaction job: its whole run)"
        return self.finish(figure, axes, title, "seconds")

    def build_phases(self) -> bytes:
        names = {k for r in self.records for k in r.build_seconds}
        ordered = [p for p in PHASE_ORDER if p in names] + sorted(names - set(PHASE_ORDER))
        palette = self.plt.get_cmap("tab10").colors
        colours = {name: palette[PHASE_ORDER.index(name) if name in PHASE_ORDER else 9] for name in ordered}
        series = {p: [r.build_seconds.get(p, 0.0) for r in self.records] for p in ordered}
        figure, axes = self._stacked(series, colours)
        return self.finish(figure, axes, "Index build phases (runs that built a version)", "seconds")

    def bytes_written(self) -> bytes:
        from matplotlib.ticker import FuncFormatter

        series = {area: [getattr(r.bytes_written, area) for r in self.records] for area in AREA_COLOURS}
        figure, axes = self._grouped(series, AREA_COLOURS, log_scale=True)
        axes.yaxis.set_major_formatter(FuncFormatter(_human_bytes))
        scale = " (log scale)" if axes.get_yscale() == "log" else ""
        return self.finish(figure, axes, "Bytes written to storage, by area", f"bytes{scale}")

    def rows_changed(self) -> bytes:
        from matplotlib.ticker import FuncFormatter

        series = {
            name: [float(getattr(r.rows, name) or 0) for r in self.records] for name in ("new", "changed", "deleted")
        }
        figure, axes = self._grouped(series, ROW_COLOURS, log_scale=True)
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:,.0f}"))
        scale = " (log scale)" if axes.get_yscale() == "log" else ""
        title = "Passages new, changed and deleted (against the snapshot before)"
        return self.finish(figure, axes, title, f"passages{scale}")

    def distortion(self) -> bytes:
        from matplotlib.lines import Line2D

        figure, axes = self.figure()
        points = [(x, r.distortion) for x, r in zip(self.x, self.records) if r.distortion is not None]
        limits = [(x, r.drift_limit) for x, r in zip(self.x, self.records) if r.drift_limit is not None]
        references = [(x, r.reference_distortion) for x, r in zip(self.x, self.records) if r.reference_distortion]
        extra = []
        if limits:
            axes.step(
                *self._edges(limits),
                where="post",
                color="#d7191c",
                linewidth=1.4,
                label="limit: reference × (1 + max_drift)",
            )
        if references:
            axes.step(
                *self._edges(references), where="post", color="#777777", linewidth=1, linestyle="--", label="reference"
            )
        if points:
            latest = next((r for r in reversed(self.records) if r.distortion and r.reference_distortion), None)
            label = "distortion"
            if latest is not None:
                label += f" ({latest.distortion / latest.reference_distortion - 1:+.2%} of reference"
                label += f", limit {latest.max_drift:+.0%})" if latest.max_drift is not None else ")"
            axes.plot(*zip(*points), marker="o", markersize=4, color="#2c7bb6", linewidth=1.5, label=label)
            values = [v for _, v in points] + [v for _, v in limits]
            low, high = min(values), max(values)
            pad = (high - low) * 0.15 or abs(high) * 0.05 or 0.01
            axes.set_ylim(low - pad, high + pad)
        else:
            extra.append(Line2D([], [], linestyle="none", label="no distortion recorded"))
        title = "Distortion: the version's relative quantization error, against its drift limit"
        return self.finish(figure, axes, title, "distortion", extra)

    def segments(self) -> bytes:
        figure, axes = self.figure()
        points = [(x, r.segments) for x, r in zip(self.x, self.records) if r.segments is not None]
        if points:
            axes.step(*self._edges(points), where="post", color="#2c7bb6", linewidth=1.5, label="segments")
            axes.plot(*zip(*points), marker="s", markersize=4, color="#2c7bb6", linestyle="none")
        axes.yaxis.get_major_locator().set_params(integer=True)
        axes.set_ylim(bottom=0, top=max([p for _, p in points] + [1]) + 1)
        right = axes.twinx()
        fractions = [
            (x, 100 * r.tombstone_fraction) for x, r in zip(self.x, self.records) if r.tombstone_fraction is not None
        ]
        colour = "#e15759"
        if fractions:
            right.step(
                *self._edges(fractions), where="post", color=colour, linewidth=1.5, label="tombstones, % of rows"
            )
            right.plot(*zip(*fractions), marker="^", markersize=4, color=colour, linestyle="none")
        right.set_ylabel("tombstones, % of stored rows", fontsize=8, color=colour)
        right.set_ylim(bottom=0, top=max([f for _, f in fractions] + [1]) * 1.25)
        right.tick_params(axis="y", labelsize=7, colors=colour)
        right.spines["top"].set_visible(False)
        handles = right.get_legend_handles_labels()[0]
        return self.finish(figure, axes, "Segments and tombstone fraction of the version", "segments", handles)

    def store_bytes(self) -> bytes:
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter

        figure, axes = self.figure()
        points = [(x, r.retention.store_bytes) for x, r in zip(self.x, self.records) if _retained(r)]
        deleted = [(x, r.retention.deleted_bytes) for x, r in zip(self.x, self.records) if _retained(r)]
        extra = []
        if points:
            axes.plot(*zip(*points), marker="o", markersize=4, color="#2c7bb6", linewidth=1.5, label="store")
            axes.bar(*zip(*deleted), width=0.6, color="#e15759", alpha=0.6, label="deleted by retention")
            axes.set_ylim(bottom=0)
        else:
            extra.append(Line2D([], [], linestyle="none", label="no retention step recorded"))
        axes.yaxis.set_major_formatter(FuncFormatter(_human_bytes))
        return self.finish(figure, axes, "The store's bytes after each retention step", "bytes", extra)

    def all(self) -> list[tuple[str, bytes]]:
        """Every figure: (title, PNG)."""
        self.made = []
        for plot in (
            self.stage_seconds,
            self.build_phases,
            self.bytes_written,
            self.rows_changed,
            self.distortion,
            self.segments,
            self.store_bytes,
        ):
            plot()
        return list(self.made)


# -- the page --------------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) or digits else f"{value:,}"


def _retained(record: HistoryRecord) -> bool:
    return record.retention is not None and record.retention.error is None


def _store_cell(record: HistoryRecord) -> str:
    kept = record.retention
    if kept is None or kept.error is not None:
        return "–" if kept is None else "failed"
    title = f"deleted {kept.deleted_objects:,} objects, {kept.deleted_bytes:,} bytes; dropped {kept.dropped_versions}"
    return f'<span title="{_e(title)}">{_e(_human_bytes(kept.store_bytes))}</span>'


def _row(record: HistoryRecord) -> str:
    rows, drift = record.rows, record.drift_limit
    mode = record.mode or "–"
    if record.compacted:
        mode += " + compaction"
    version = record.version or ""
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in record.stage_seconds.items())
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in record.build_seconds.items())
    distortion = "–" if record.distortion is None else f"{record.distortion:.5f}"
    if drift is not None:
        distortion += f" / {drift:.5f}"
    recall = "–" if record.recall_at_100 is None else f"{record.recall_at_100:.3f}"
    if record.refined_recall_at_100 is not None:
        recall += f" ({record.refined_recall_at_100:.3f})"
    per_passage = (record.bytes_per_passage or {}).get("total")
    kinds = ", ".join(f"{k} {v:,.0f}" for k, v in (record.bytes_per_passage or {}).items() if k != "total")
    if record.serve_moved is None:
        serve = "–"
    else:
        serve = ("moved" if record.serve_moved else "not moved") + (
            f" in {record.serve_seconds:.1f}s" if record.serve_seconds is not None else ""
        )
    status = "ok" if record.status == "ok" else f"failed ({record.failed_stage or '?'})"
    published = {True: "", False: " (found published)", None: ""}[record.published]
    marks = " ".join(f'<span class="mark {m}">{_e(MARKS[m][2])}</span>' for m in _marks_of(record))
    cells = [
        _e(record.when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")),
        f"{_e(record.kind)} {marks}",
        _e(status),
        _e(record.snapshot or "–"),
        f'<span title="{_e(version)}">{_e(version[:18] + ("…" if len(version) > 18 else "") or "–")}</span>'
        + _e(published),
        _e(mode),
        f"{_num(rows.new)} / {_num(rows.changed)} / {_num(rows.deleted)}",
        _e(_num(rows.encoded)),
        f'<span title="{_e(stages)}{_e("; " + phases if phases else "")}">{record.seconds:,.1f}</span>',
        f'<span title="passages {record.bytes_written.passages:,}, embeddings {record.bytes_written.embeddings:,},'
        f' index {record.bytes_written.index:,}">{_e(_human_bytes(record.bytes_written.total))}</span>',
        _e(_num(record.segments)),
        _e("–" if record.tombstone_fraction is None else f"{100 * record.tombstone_fraction:.1f}%"),
        _e(distortion),
        _e(recall),
        f'<span title="{_e(kinds)}">{_e(_num(per_passage))}</span>',
        _e(serve),
        _store_cell(record),
        _e(record.error or (record.retention.error if record.retention else "") or ""),
    ]
    css = ' class="failed"' if record.status == "failed" else ""
    return f"<tr{css}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


HEADERS = (
    "started (UTC)",
    "kind",
    "status",
    "snapshot",
    "version",
    "mode",
    "new / changed / deleted",
    "encoded",
    "seconds",
    "written",
    "segments",
    "tombstones",
    "distortion / limit",
    "recall@100 (refined)",
    "bytes / passage",
    "Serve app",
    "store after retention",
    "error",
)

STYLE = """
body { font: 14px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
p.meta { color: #555; margin: 0 0 16px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; position: sticky; top: 0; }
td:nth-child(7), td:nth-child(8), td:nth-child(9), td:nth-child(10), td:nth-child(11), td:nth-child(12),
td:nth-child(15) { text-align: right; white-space: nowrap; }
tr.failed td { background: #fde8e8; }
td:last-child { max-width: 360px; word-break: break-word; color: #a00; }
span.mark { display: inline-block; font-size: 10px; padding: 0 4px; border-radius: 3px; color: #fff; }
span.mark.full { background: #7b3294; } span.mark.compaction { background: #e66101; }
span.mark.failed { background: #d7191c; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px 24px; }
figure { margin: 0; } figcaption { font-size: 13px; font-weight: 600; margin: 0 0 4px; }
img { display: block; width: 100%; max-width: 720px; height: auto; }
.scroll { overflow-x: auto; }
"""


def render(
    records: Sequence[HistoryRecord], source: str = "", skipped: Sequence[str] = (), now: dt.datetime | None = None
) -> str:
    """The page for `records` (oldest first): the plots, then the table, newest first (pure)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    records = list(records)
    body = [
        "<h1>Nightly history</h1>",
        f'<p class="meta">{len(records)} runs from {_e(source)}, generated {_e(now.strftime("%Y-%m-%d %H:%M UTC"))}.'
        " Hover a version, the seconds, the bytes or the bytes per passage for details.</p>",
    ]
    if skipped:
        body.append(f'<p class="meta">Skipped {len(skipped)} unreadable records: ' + _e("; ".join(skipped)) + "</p>")
    if records:
        body.append('<h2>Over time, oldest left</h2><div class="plots">')
        for title, png in Plotter(records).all():
            data = base64.b64encode(png).decode("ascii")
            image = f'<img alt="{_e(title)}" src="data:image/png;base64,{data}">'
            body.append(f"<figure><figcaption>{_e(title)}</figcaption>{image}</figure>")
        body.append("</div>")
    else:
        body.append("<p>No runs recorded yet.</p>")
    body.append('<h2>Runs, newest first</h2><div class="scroll"><table>')
    body.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in HEADERS) + "</tr></thead><tbody>")
    body.extend(_row(record) for record in reversed(records))
    body.append("</tbody></table></div>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Nightly history</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def default_output(storage: Storage) -> Path:
    """`<storage.root>/nightly/report.html` when the root is local, else `report.html` in the working directory."""
    return Path(storage.path(history_report())) if storage.is_local else Path.cwd() / "report.html"


def _shown(storage: Storage) -> str:
    """The store as the page names it: a local one relative to the working directory when it lies below it (no
    machine's own path in a page that is shared), else its URL."""
    if storage.is_local and Path(storage.root_url).is_relative_to(Path.cwd()):
        return os.path.relpath(storage.root_url)
    return storage.url()


def run_report(config: PipelineConfig, out: str | None = None, last: int = DEFAULT_LAST) -> dict[str, Any]:
    storage = Storage(config.storage.root, config.storage.options)
    records, skipped = read_history(storage, last)
    path = Path(out) if out else default_output(storage)
    page = render(records, _shown(storage), skipped)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(path)
    log.info("wrote the report of %d runs to %s", len(records), path.resolve())
    return {
        "output": str(path.resolve()),
        "records": len(records),
        "skipped": len(skipped),
        "first": records[0].when.isoformat() if records else None,
        "last": records[-1].when.isoformat() if records else None,
        "bytes": path.stat().st_size,
    }
