"""The standard 12-lead print layout as SVG, for the console and the printer.

A4 landscape (297 x 210 mm) in millimetres: a header (patient, time, device, heart rate, the
quality verdict and its problems), ECG paper (1 mm and 5 mm grid), and four strips: three rows
of leads in columns (I II III | aVR aVL aVF | V1 V2 V3 | V4 V5 V6, 2.5 s each, the columns
showing consecutive time) and a 10 s rhythm strip of lead II. 25 mm/s, 10 mm/mV, with a
1 mV x 200 ms calibration pulse at the start of every strip.

Other lead sets keep the geometry and label exactly what was recorded: leads fill columns of
three (limb leads first, then chest leads V1-V9, then right-sided ones such as V3R, then anything
else), the columns share the 10 s (limb leads only: 2 columns of 5 s; 15 leads: 5 columns of
2 s), and three or fewer leads get a 10 s strip each. Leads the cart computed (derived) carry an
asterisk; leads the file says were not recorded are listed in the footer. Samples lost in
transit (`recording.gaps`) leave the paper blank for their time, so every beat after a gap is
drawn at its own time and no line joins the beats either side.

Size: traces are drawn from min/max pairs every 0.2 mm (a point per 0.1 mm, about print
resolution at 25 mm/s: every R peak stays), as integer relative path steps in 0.1 mm units
under a scale(.1) group. A 12-lead page is 45-50 KB (9-11 KB gzipped).

Printing: the page declares its size in mm, so a browser prints it at 25 mm/s and 10 mm/mV.
No plotting library: plain string building (stdlib + numpy).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from xml.sax.saxutils import escape

import numpy as np

from devices.ecg.quality import (
    ACCEPTABLE,
    BASELINE_WANDER,
    LEAD_OFF,
    LIMB_LEAD_REVERSAL,
    MAINS_NOISE,
    MUSCLE_NOISE,
    RE_RECORD,
    SATURATION,
    WARN,
    QualityReport,
    check_quality,
)
from devices.ecg.recording import EcgRecording, merged_gaps, on_time_axis
from devices.identity import Patient, TimeSource
from lastmile.clock import clinic_time
from lastmile.reports.report_text import display_name

# --- paper ---------------------------------------------------------------------------------
PAPER_SPEED_MM_PER_S = 25.0
GAIN_MM_PER_MV = 10.0
MINOR_GRID_MM = 1.0
MAJOR_GRID_MM = 5.0
CAL_PULSE_MV = 1.0
CAL_PULSE_S = 0.2

# --- page geometry (mm) --------------------------------------------------------------------
PAGE_WIDTH_MM = 297.0
PAGE_HEIGHT_MM = 210.0
GRID_LEFT_MM = 11.0
GRID_TOP_MM = 40.0
GRID_WIDTH_MM = 275.0
GRID_HEIGHT_MM = 160.0
STRIP_HEIGHT_MM = 40.0  # 4 mV of room per strip
STRIPS = 4
FIRST_BASELINE_MM = GRID_TOP_MM + STRIP_HEIGHT_MM / 2
CAL_X_MM = 13.0  # 1 mm lead-in, 5 mm pulse, 1 mm lead-out
TRACE_X_MM = 21.0
PRINT_SECONDS = 10.0  # what the page shows: 250 mm at 25 mm/s
TRACE_WIDTH_MM = PRINT_SECONDS * PAPER_SPEED_MM_PER_S
ROWS = 3
MAX_COLUMNS = 6  # 18 leads; more would make columns under 1.7 s

# --- trace encoding ------------------------------------------------------------------------
UNIT_MM = 0.1  # path coordinates are integers of 0.1 mm
BIN_MM = 0.2  # one min/max pair per 0.2 mm of paper
UV_PER_UNIT = UNIT_MM / GAIN_MM_PER_MV * 1000.0  # 10 µV per 0.1 mm at 10 mm/mV
CLAMP_MM = 5.0  # a trace may leave its strip by this much, no more (a rail is off the page)

LIMB_ORDER = ("I", "II", "III", "aVR", "aVL", "aVF")
RHYTHM_PREFERENCE = ("II", "I", "V1", "V5")

_SEX = {"M": "男 M", "F": "女 F", "O": "其他 O"}
# the console's words for the verdict (its zh-CN catalog), English second: one page for screen and print
_VERDICT = {
    ACCEPTABLE: "合格 acceptable",
    WARN: "合格，但有问题 acceptable with problems",
    RE_RECORD: "需要重做 record again",
}
_TAG = {
    LEAD_OFF: "脱落 off",
    SATURATION: "饱和 clipped",
    BASELINE_WANDER: "漂移 wander",
    MAINS_NOISE: "工频 mains",
    MUSCLE_NOISE: "肌电 EMG",
    LIMB_LEAD_REVERSAL: "接反 swapped",
}
_STYLE = (
    # the sheet is the page: without it a browser prints the 297 mm page shrunk onto its default
    # paper (Letter or A4 portrait, about 2/3 scale), and 25 mm/s would measure 16.7 mm/s
    "@page{size:297mm 210mm;margin:0}"
    "text{font-family:'Noto Sans CJK SC','Source Han Sans SC','WenQuanYi Micro Hei','Microsoft YaHei',"
    "'PingFang SC',sans-serif;font-size:3px;fill:#000}"
    ".n{fill:none;stroke:#f4c6c6;stroke-width:.1}"
    ".j{fill:none;stroke:#e08c8c;stroke-width:.2}"
    ".t{fill:none;stroke:#000;stroke-width:2.5;stroke-linejoin:round;stroke-linecap:round}"
    ".c{fill:none;stroke:#000;stroke-width:.25}"
    ".l{font-size:3.5px;font-weight:bold}"
    ".p,.b{fill:#c00}.b{fill:none;stroke:#c00;stroke-width:.3;stroke-dasharray:1.5 1.5}"
    ".h{font-size:5px;font-weight:bold}.s{font-size:2.6px}"
)


@dataclass(frozen=True, slots=True)
class LeadBox:
    """Where one lead segment sits on the page (mm) and which time it shows (s)."""

    lead: str
    x_mm: float  # left edge of the trace
    baseline_mm: float  # y of 0 mV
    width_mm: float
    start_s: float
    seconds: float
    strip: int  # 0-2: lead rows, 3: rhythm strip
    column: int


@dataclass(frozen=True, slots=True)
class Layout:
    boxes: tuple[LeadBox, ...]
    columns: int
    column_seconds: float
    rhythm_lead: str | None
    not_shown: tuple[str, ...]  # leads that did not fit (more than MAX_COLUMNS x 3)


def _ordered(names: tuple[str, ...]) -> list[str]:
    limb = [n for n in LIMB_ORDER if n in names]
    chest = [n for n in names if n not in limb and n.startswith("V") and not n.endswith("R")]
    right = [n for n in names if n not in limb and n.startswith("V") and n.endswith("R")]
    other = [n for n in names if n not in limb and n not in chest and n not in right]
    return limb + chest + right + other


def plan_layout(lead_names: tuple[str, ...]) -> Layout:
    """Lead boxes for a recording's leads (see the module docstring)."""
    ordered = _ordered(lead_names)
    if len(ordered) <= ROWS:
        single = tuple(
            LeadBox(lead, TRACE_X_MM, FIRST_BASELINE_MM + i * STRIP_HEIGHT_MM, TRACE_WIDTH_MM, 0.0, PRINT_SECONDS, i, 0)
            for i, lead in enumerate(ordered)
        )
        return Layout(single, 1, PRINT_SECONDS, None, ())
    # limb leads keep their own columns (I II III | aVR aVL aVF) even when some are missing
    groups: list[list[str]] = []
    limb = [n for n in ordered if n in LIMB_ORDER]
    rest = [n for n in ordered if n not in LIMB_ORDER]
    for part in (limb, rest):
        groups += [part[i : i + ROWS] for i in range(0, len(part), ROWS)]
    shown, hidden = groups[:MAX_COLUMNS], [lead for g in groups[MAX_COLUMNS:] for lead in g]
    columns = len(shown)
    seconds = PRINT_SECONDS / columns
    width = seconds * PAPER_SPEED_MM_PER_S
    boxes = [
        LeadBox(
            lead, TRACE_X_MM + c * width, FIRST_BASELINE_MM + r * STRIP_HEIGHT_MM, width, c * seconds, seconds, r, c
        )
        for c, group in enumerate(shown)
        for r, lead in enumerate(group)
    ]
    rhythm = next((n for n in RHYTHM_PREFERENCE if n in lead_names), ordered[0])
    boxes.append(
        LeadBox(
            rhythm, TRACE_X_MM, FIRST_BASELINE_MM + ROWS * STRIP_HEIGHT_MM, TRACE_WIDTH_MM, 0.0, PRINT_SECONDS, ROWS, 0
        )
    )
    return Layout(tuple(boxes), columns, seconds, rhythm, tuple(hidden))


# ----------------------------------------------------------------------------- traces


def _number_pairs(dx: np.ndarray, dy: np.ndarray) -> str:
    """'dx dy dx dy ...' with the separators SVG allows to be dropped before a minus sign."""
    flat = np.empty(dx.size * 2, dtype=np.int64)
    flat[0::2], flat[1::2] = dx, dy
    text = " ".join(map(str, flat.tolist()))
    return text.replace(" -", "-")


def trace_path(uv: np.ndarray, rate_hz: float, *, clamp_units: int, first_sample: int = 0) -> str:
    """Path data (in 0.1 mm units, origin at the segment's start on its baseline) of µV samples
    relative to the baseline: min and max of every 0.2 mm bin, in time order. `first_sample`:
    where `uv` starts in the segment (a run after a gap)."""
    n = uv.size
    if n == 0:
        return ""
    per_bin = max(1, int(round(rate_hz * BIN_MM / PAPER_SPEED_MM_PER_S)))
    bins = -(-n // per_bin)
    padded = np.pad(uv, (0, bins * per_bin - n), mode="edge").reshape(bins, per_bin)
    lo, hi = padded.argmin(axis=1), padded.argmax(axis=1)
    first, second = np.minimum(lo, hi), np.maximum(lo, hi)
    base = np.arange(bins) * per_bin
    idx = np.stack([base + first, base + second], axis=1).ravel()
    keep = np.ones(idx.size, dtype=bool)
    keep[1::2] = second != first
    idx = np.minimum(idx[keep], n - 1)
    x = np.round((idx + first_sample) / rate_hz * PAPER_SPEED_MM_PER_S / UNIT_MM).astype(np.int64)
    y = np.clip(-np.round(uv[idx] / UV_PER_UNIT), -clamp_units, clamp_units).astype(np.int64)
    # drop points in the middle of horizontal runs (a flat lead costs two points, not hundreds)
    dy = np.diff(y)
    inner = np.zeros(y.size, dtype=bool)
    inner[1:-1] = (dy[:-1] == 0) & (dy[1:] == 0)
    x, y = x[~inner], y[~inner]
    head = f"M{x[0]} {y[0]}".replace(" -", "-")
    if x.size == 1:
        return head + "h1"
    return head + "l" + _number_pairs(np.diff(x), np.diff(y))


def gapped_path(uv: np.ndarray, rate_hz: float, *, clamp_units: int) -> str:
    """`trace_path` of each run of samples between gaps (NaN), each its own subpath: the paper
    stays blank where no sample arrived, and no line joins the beats either side."""
    present = np.isfinite(uv)
    if present.all():
        return trace_path(uv, rate_hz, clamp_units=clamp_units)
    edges = np.diff(np.concatenate(([0], present.astype(np.int8), [0])))
    runs = zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))
    return "".join(
        trace_path(uv[start:end], rate_hz, clamp_units=clamp_units, first_sample=int(start)) for start, end in runs
    )


def _baselines(uv: np.ndarray) -> np.ndarray:
    """Each lead's median µV (0 for a lead with no sample in `uv`): the level drawn on its baseline."""
    return np.array([np.median(lead[np.isfinite(lead)]) if np.isfinite(lead).any() else 0.0 for lead in uv])


# ----------------------------------------------------------------------------- page parts


def _grid() -> str:
    x0, y0, w, h = GRID_LEFT_MM, GRID_TOP_MM, GRID_WIDTH_MM, GRID_HEIGHT_MM

    def lines(step: float, skip: float | None) -> str:
        parts = [f"M{x0:g} {y0:g}"]
        nx, ny = int(round(w / step)), int(round(h / step))
        cols = [i for i in range(nx + 1) if skip is None or (i * step) % skip]
        rows = [j for j in range(ny + 1) if skip is None or (j * step) % skip]
        at_x, at_y = 0.0, 0.0
        for i in cols:
            parts.append(f"m{i * step - at_x:g} {-at_y:g}v{h:g}")
            at_x, at_y = i * step, h
        parts.append(f"M{x0:g} {y0:g}")
        at_x, at_y = 0.0, 0.0
        for j in rows:
            parts.append(f"m{-at_x:g} {j * step - at_y:g}h{w:g}")
            at_x, at_y = w, j * step
        return "".join(parts).replace(" -", "-")

    return (
        f'<path class="n" d="{lines(MINOR_GRID_MM, MAJOR_GRID_MM)}"/><path class="j" d="{lines(MAJOR_GRID_MM, None)}"/>'
    )


def _calibration(baseline_mm: float) -> str:
    height = CAL_PULSE_MV * GAIN_MM_PER_MV
    width = CAL_PULSE_S * PAPER_SPEED_MM_PER_S
    return f'<path class="c" d="M{CAL_X_MM:g} {baseline_mm:g}h1v{-height:g}h{width:g}v{height:g}h1"/>'


def _age(patient: Patient, on: dt.date) -> str:
    if patient.birth_date is None:
        return ""
    b = patient.birth_date
    years = on.year - b.year - ((on.month, on.day) < (b.month, b.day))
    return f"{years} 岁 y" if 0 <= years < 150 else ""


def _text(x: float, y: float, content: str, cls: str = "", anchor: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    attrs += f' text-anchor="{anchor}"' if anchor else ""
    return f'<text x="{x:g}" y="{y:g}"{attrs}>{escape(content)}</text>'


def _text_width_mm(text: str, font_mm: float) -> float:
    return sum(font_mm if ord(ch) > 0x2E7F else 0.55 * font_mm for ch in text)


def _wrap(text: str, font_mm: float, width_mm: float) -> list[str]:
    """Lines of at most `width_mm` (estimated): Latin text breaks at spaces, CJK anywhere."""
    lines: list[str] = []
    line = ""
    for token in _tokens(text):
        if line and _text_width_mm(line + token, font_mm) > width_mm:
            lines.append(line.rstrip())
            line = token.lstrip()
        else:
            line += token
    if line.strip():
        lines.append(line.rstrip())
    return lines


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    word = ""
    for ch in text:
        if ord(ch) > 0x2E7F:  # a CJK character is a token of its own
            if word:
                tokens.append(word)
                word = ""
            tokens.append(ch)
        elif ch == " ":
            tokens.append(word + " ")
            word = ""
        else:
            word += ch
    if word:
        tokens.append(word)
    return tokens


def _header(recording: EcgRecording, report: QualityReport, patient: Patient | None) -> list[str]:
    right = GRID_LEFT_MM + GRID_WIDTH_MM
    out = []
    if patient is not None:
        name = display_name(patient.name) or "（无姓名 no name）"
        details = [f"ID {patient.patient_id}", _SEX.get(patient.sex, ""), _age(patient, recording.acquired_at.date())]
        out.append(_text(GRID_LEFT_MM, 11, name, "h"))
        out.append(_text(GRID_LEFT_MM + _text_width_mm(name, 5) + 4, 11, " · ".join(d for d in details if d)))
    else:
        out.append(_text(GRID_LEFT_MM, 11, "无患者 no patient", "h"))  # as the console says it
    when = clinic_time(recording.acquired_at, minutes=True)  # the clinic's wall clock, as the console shows it
    if recording.time_source == TimeSource.GATEWAY_RECEIPT:
        when += "（接收时间 time received）"
    elif recording.time_source == TimeSource.DEVICE_CLOCK_UNTRUSTED:
        when += "（心电图机时钟不对 cart clock wrong）"
    out.append(_text(right, 8.5, f"采集 Acquired {when}", anchor="end"))
    out.append(_text(right, 12.5, f"设备 Device {recording.device.label()}", anchor="end"))
    rate = "—" if report.heart_rate_bpm is None else f"{report.heart_rate_bpm:.0f}"
    verdict_cls = "" if report.verdict == ACCEPTABLE else "p"
    summary = (
        f"心率 HR {rate} 次/分 bpm   {PAPER_SPEED_MM_PER_S:g} mm/s   {GAIN_MM_PER_MV:g} mm/mV   "
        f"{recording.sampling_rate_hz:g} Hz"
    )
    out.append(_text(GRID_LEFT_MM, 17.5, summary))
    out.append(_text(right, 17.5, f"质量 Quality: {_VERDICT[report.verdict]}", verdict_cls, "end"))
    # problems: Chinese line(s), then English in smaller type, as many as fit above the grid
    y, bottom = 22.0, GRID_TOP_MM - 1.0
    shown = 0
    for problem in report.problems:
        zh = _wrap("• " + problem.message_zh, 3.0, GRID_WIDTH_MM)
        en = _wrap(problem.message_en, 2.6, GRID_WIDTH_MM - 2)
        height = 3.4 * len(zh) + 2.9 * len(en)
        more_left = len(report.problems) - shown - 1
        if y + height - 3.0 > bottom - (3.0 if more_left else 0):
            break
        for line in zh:
            out.append(_text(GRID_LEFT_MM, y, line, "p"))
            y += 3.4
        for line in en:
            out.append(_text(GRID_LEFT_MM + 2, y - 0.4, line, "s p"))
            y += 2.9
        shown += 1
    if shown < len(report.problems):
        more = len(report.problems) - shown
        out.append(_text(right, 22.0, f"另有 {more} 项问题，见红色标记 / {more} more, marked in red", "s p", "end"))
    return out


def _footer(recording: EcgRecording, layout: Layout, duration_s: float) -> str:
    notes = ["Lastmile 预览，诊断以上级医院报告为准 / preview, not a diagnostic report"]
    if recording.derived_leads:
        notes.append("* 计算导联 derived from the recorded limb leads")
    if duration_s > PRINT_SECONDS + 0.05:
        notes.append(f"显示前 10 秒，共 {duration_s:.1f} 秒 / first 10 s of {duration_s:.1f} s")
    lost_s = sum(gap.missing for gap in recording.gaps) / recording.sampling_rate_hz
    if lost_s:
        notes.append(f"信号中断（空白处）共 {lost_s:.1f} 秒 / {lost_s:.1f} s of signal lost (blank)")
    for flag in recording.flags:
        if flag.startswith("leads-not-recorded:"):
            notes.append(f"未记录 not recorded: {flag.split(':', 1)[1].replace(',', ', ')}")
    if layout.not_shown:
        notes.append(f"未显示 not shown: {', '.join(layout.not_shown)}")
    return _text(GRID_LEFT_MM, GRID_TOP_MM + GRID_HEIGHT_MM + 5, "   ·   ".join(notes), "s")


def render_preview_svg(
    recording: EcgRecording, report: QualityReport | None = None, *, patient: Patient | None = None
) -> str:
    """The print layout of a recording as an SVG document (UTF-8 text).

    `report`: the quality report to show (computed here when None). `patient`: overrides the
    recording's own patient (the clinic's record, with the name in Chinese).
    """
    if report is None:
        report = check_quality(recording)
    patient = patient if patient is not None else recording.patient
    layout = plan_layout(recording.lead_names)
    rate = float(recording.sampling_rate_hz)
    uv, _ = on_time_axis(recording.microvolts(), merged_gaps(recording.gaps), np.nan)  # NaN: never arrived
    n_time = uv.shape[1]
    offsets = _baselines(uv[:, : min(n_time, int(math.ceil(PRINT_SECONDS * rate)))])
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{PAGE_WIDTH_MM:g}mm" height="{PAGE_HEIGHT_MM:g}mm" '
        f'viewBox="0 0 {PAGE_WIDTH_MM:g} {PAGE_HEIGHT_MM:g}" data-speed-mm-s="{PAPER_SPEED_MM_PER_S:g}" '
        f'data-gain-mm-mv="{GAIN_MM_PER_MV:g}">',
        f"<style>{_STYLE}</style>",
        f'<rect width="{PAGE_WIDTH_MM:g}" height="{PAGE_HEIGHT_MM:g}" fill="#fff"/>',
        _grid(),
    ]
    parts += _header(recording, report, patient)
    strips = sorted({box.strip for box in layout.boxes})
    for strip in strips:
        parts.append(_calibration(FIRST_BASELINE_MM + strip * STRIP_HEIGHT_MM))
    clamp_units = int(round((STRIP_HEIGHT_MM / 2 + CLAMP_MM) / UNIT_MM))
    for box in layout.boxes:
        i = recording.lead_names.index(box.lead)
        first = int(round(box.start_s * rate))
        last = min(n_time, int(round((box.start_s + box.seconds) * rate)))
        segment = uv[i, first:last] - offsets[i]
        problems = report.problems_on(box.lead)
        label = box.lead + ("*" if box.lead in recording.derived_leads else "")
        top = box.baseline_mm - STRIP_HEIGHT_MM / 2
        attrs = (
            f'data-lead="{escape(box.lead)}" data-strip="{box.strip}" data-column="{box.column}" '
            f'data-start-s="{box.start_s:g}" data-seconds="{box.seconds:g}" '
            f'data-offset-uv="{offsets[i]:.3f}"'
        )
        parts.append(f"<g {attrs}>")
        if problems:
            parts.append(
                f'<rect class="b" x="{box.x_mm:g}" y="{top + 0.5:g}" width="{box.width_mm:g}" '
                f'height="{STRIP_HEIGHT_MM - 1:g}"/>'
            )
            tags = " ".join(dict.fromkeys(_TAG[p.kind] for p in problems if p.kind in _TAG))
            parts.append(_text(box.x_mm + 1, top + 4.5, f"{label} {tags}", "l p"))
        else:
            parts.append(_text(box.x_mm + 1, top + 4.5, label, "l"))
        d = gapped_path(segment, rate, clamp_units=clamp_units) if segment.size else ""
        if d:  # a box that falls wholly in a gap stays blank
            parts.append(f'<path class="t" transform="translate({box.x_mm:g} {box.baseline_mm:g}) scale(.1)" d="{d}"/>')
        parts.append("</g>")
        if box.column > 0 and box.strip < ROWS:  # column boundary tick
            parts.append(f'<path class="c" d="M{box.x_mm:g} {box.baseline_mm - 2.5:g}v5"/>')
    parts.append(_footer(recording, layout, n_time / rate))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
