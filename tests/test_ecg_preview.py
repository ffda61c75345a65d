"""The 12-lead print preview (lastmile/ecg/preview.py): geometry measured on the SVG itself."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

from devices.ecg.quality import check_quality
from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording, SampleGap
from devices.identity import Patient, TimeSource
from lastmile.ecg import preview
from lastmile.ecg.preview import display_name, plan_layout, render_preview_svg
from tests import ecg_faults as faults
from tests.conftest import missing, require_tool
from tests.ecg_factories import make_recording
from tests.real_ecgs import recording

SVG = "{http://www.w3.org/2000/svg}"
T0 = dt.datetime(2026, 11, 2, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))
PATIENT = Patient("110105195403120021", "Wang^Xiuying=王^秀英", dt.date(1954, 3, 12), "F")


def points(d: str, origin: tuple[float, float] = (0.0, 0.0), scale: float = 1.0) -> list[list[tuple[float, float]]]:
    """Absolute vertices of an SVG path made of M/m/l/h/v commands (subpaths as lists)."""
    tokens = re.findall(r"[MmLlHhVv]|-?(?:\d+\.?\d*|\.\d+)", d)
    x = y = 0.0
    paths: list[list[tuple[float, float]]] = []
    cmd = ""
    i = 0
    while i < len(tokens):
        if tokens[i].isalpha():
            cmd = tokens[i]
            i += 1
            continue
        if cmd in "Mm":
            dx, dy = float(tokens[i]), float(tokens[i + 1])
            x, y = (dx, dy) if cmd == "M" else (x + dx, y + dy)
            paths.append([(x, y)])
            i += 2
            cmd = "l" if cmd == "m" else "L"
            continue
        if cmd in "Ll":
            dx, dy = float(tokens[i]), float(tokens[i + 1])
            x, y = (dx, dy) if cmd == "L" else (x + dx, y + dy)
            i += 2
        elif cmd in "Hh":
            x = float(tokens[i]) if cmd == "H" else x + float(tokens[i])
            i += 1
        elif cmd in "Vv":
            y = float(tokens[i]) if cmd == "V" else y + float(tokens[i])
            i += 1
        paths[-1].append((x, y))
    ox, oy = origin
    return [[(ox + px * scale, oy + py * scale) for px, py in p] for p in paths]


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode("utf-8"))


def lead_groups(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(SVG + "g") if "data-lead" in g.attrib]


def trace_runs(group: ET.Element) -> list[list[tuple[float, float]]]:
    """Every subpath of a lead's trace, in page millimetres."""
    path = group.find(SVG + "path")
    assert path is not None
    m = re.fullmatch(r"translate\(([\d.]+) ([\d.]+)\) scale\(\.1\)", path.get("transform", ""))
    assert m, path.get("transform")
    return points(path.get("d", ""), (float(m.group(1)), float(m.group(2))), 0.1)


def trace_points(group: ET.Element) -> list[tuple[float, float]]:
    return trace_runs(group)[0]


def one_lead(samples: np.ndarray, **extra: object) -> EcgRecording:
    """Lead II alone at 500 Hz, 1 µV per unit: a full 10 s strip of its own."""
    return EcgRecording(
        samples=samples,
        lead_names=("II",),
        sampling_rate_hz=500.0,
        uv_per_unit=1.0,
        acquired_at=T0,
        time_source=TimeSource.DEVICE_CLOCK,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def mortara() -> EcgRecording:
    return recording("mortara-dicom")


@pytest.fixture(scope="module")
def mortara_svg(mortara: EcgRecording) -> str:
    return render_preview_svg(mortara, patient=PATIENT)


# ----------------------------------------------------------------------------- layout


def test_twelve_leads_in_three_rows_of_four_columns_and_a_rhythm_strip(mortara_svg: str) -> None:
    groups = lead_groups(parse(mortara_svg))
    assert len(groups) == 13
    expected = [("I", "II", "III"), ("aVR", "aVL", "aVF"), ("V1", "V2", "V3"), ("V4", "V5", "V6")]
    for column, leads in enumerate(expected):
        for row, lead in enumerate(leads):
            (g,) = [g for g in groups if g.get("data-lead") == lead and g.get("data-strip") == str(row)]
            assert g.get("data-column") == str(column)
            assert float(g.get("data-start-s")) == pytest.approx(2.5 * column)
            assert float(g.get("data-seconds")) == pytest.approx(2.5)
            first = trace_points(g)[0]
            assert first[0] == pytest.approx(21.0 + 62.5 * column, abs=0.11)  # 2.5 s x 25 mm/s
            label = g.find(SVG + "text")
            assert label is not None and label.text == lead
            assert float(label.get("y")) == pytest.approx(40.0 + 40.0 * row + 4.5)
    (rhythm,) = [g for g in groups if g.get("data-strip") == "3"]
    assert rhythm.get("data-lead") == "II" and float(rhythm.get("data-seconds")) == 10.0
    pts = trace_points(rhythm)
    assert pts[0][0] == pytest.approx(21.0, abs=0.11) and pts[-1][0] == pytest.approx(21.0 + 250.0, abs=0.3)


def test_grid_has_1_mm_and_5_mm_lines_over_the_whole_paper(mortara_svg: str) -> None:
    root = parse(mortara_svg)
    minor = root.find(f"{SVG}path[@class='n']")
    major = root.find(f"{SVG}path[@class='j']")
    assert minor is not None and major is not None

    def lines(path: ET.Element) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for sub in points(path.get("d", "")):
            for (x0, y0), (x1, y1) in itertools.pairwise(sub):
                if x0 == x1 and y0 != y1:
                    xs.append(round(x0, 6))
                elif y0 == y1 and x0 != x1:
                    ys.append(round(y0, 6))
        return sorted(set(xs)), sorted(set(ys))

    major_x, major_y = lines(major)
    minor_x, minor_y = lines(minor)
    assert np.allclose(np.diff(major_x), 5.0) and np.allclose(np.diff(major_y), 5.0)
    assert (major_x[0], major_x[-1], major_y[0], major_y[-1]) == (11.0, 286.0, 40.0, 200.0)
    every_mm = sorted(set(minor_x) | set(major_x))
    assert np.allclose(np.diff(every_mm), 1.0) and len(every_mm) == 276
    assert np.allclose(np.diff(sorted(set(minor_y) | set(major_y))), 1.0)
    assert not set(minor_x) & set(major_x)  # no line drawn twice


def test_calibration_pulse_is_1_mv_by_200_ms_at_scale(mortara_svg: str) -> None:
    pulses = [
        p for p in parse(mortara_svg).iter(SVG + "path") if p.get("class") == "c" and p.get("d", "").startswith("M13 ")
    ]
    assert len(pulses) == 4  # one per strip
    for strip, pulse in enumerate(pulses):
        (pts,) = points(pulse.get("d", ""))
        ys = [p[1] for p in pts]
        baseline = 60.0 + 40.0 * strip
        assert ys[0] == ys[-1] == baseline
        assert baseline - min(ys) == pytest.approx(preview.CAL_PULSE_MV * preview.GAIN_MM_PER_MV) == 10.0
        top = [x for x, y in pts if y == min(ys)]
        assert max(top) - min(top) == pytest.approx(preview.CAL_PULSE_S * preview.PAPER_SPEED_MM_PER_S) == 5.0


def test_a_known_sample_lands_where_10_mm_per_mv_and_25_mm_per_s_put_it(
    mortara: EcgRecording, mortara_svg: str
) -> None:
    (rhythm,) = [g for g in lead_groups(parse(mortara_svg)) if g.get("data-strip") == "3"]
    offset = float(rhythm.get("data-offset-uv"))
    uv = mortara.microvolts()[mortara.lead_names.index("II")]
    peak = int(np.argmax(uv))  # the tallest R wave: min/max decimation must keep it
    x_mm = 21.0 + peak / mortara.sampling_rate_hz * 25.0
    y_mm = 180.0 - (uv[peak] - offset) / 1000.0 * 10.0
    pts = np.array(trace_points(rhythm))
    nearest = pts[np.argmin(np.abs(pts[:, 0] - x_mm) + np.abs(pts[:, 1] - y_mm))]
    assert nearest[0] == pytest.approx(x_mm, abs=0.11) and nearest[1] == pytest.approx(y_mm, abs=0.11)
    assert pts[:, 1].min() == pytest.approx(y_mm, abs=0.11)  # and nothing drawn higher


def test_one_millivolt_step_is_ten_millimetres() -> None:
    samples = np.zeros((1, 5000), dtype=np.int16)
    samples[0, 2500:] = 1000  # 1 mV at 1 µV per unit
    (g,) = lead_groups(parse(render_preview_svg(one_lead(samples))))
    offset = float(g.get("data-offset-uv"))
    ys = sorted({round(y, 3) for _, y in trace_points(g)})
    assert ys[-1] - ys[0] == pytest.approx(10.0)
    assert ys[-1] == pytest.approx(60.0 + offset / 100.0)  # 0 µV drawn offset/100 mm below the baseline


def test_samples_after_a_gap_are_drawn_at_their_own_time_and_the_gap_is_left_blank() -> None:
    """A streamed ECG lost 1 s at 5 s (SampleGap): the samples after it belong at 6 s. Drawn
    straight on, every beat after the gap moved 25 mm left and the beats either side were
    joined, an RR interval 1 s short: what a premature beat looks like on paper."""
    samples = (np.arange(5500) % 50).astype(np.int16)[None, :]  # a 50 µV sawtooth: drawn everywhere
    samples[0, 2500:] += 1000  # the first sample after the gap, at 6.0 s, steps up 1 mV
    (g,) = lead_groups(parse(render_preview_svg(one_lead(samples, gaps=(SampleGap(start=2500, missing=500),)))))
    left = 21.0  # where a strip starts on the page, as the tests above measure it
    runs = trace_runs(g)
    drawn = [(x - left) / 25.0 for run in runs for x, _ in run]  # seconds from the strip's start
    assert not [t for t in drawn if 5.01 < t < 5.99], "a trace drawn where no sample arrived"
    ys = [y for run in runs for _, y in run]
    middle = (min(ys) + max(ys)) / 2
    step_at = min((x - left) / 25.0 for run in runs for x, y in run if y < middle)
    assert step_at == pytest.approx(6.0, abs=0.01)


def test_decimation_keeps_every_peak_and_trough_of_each_fifth_of_a_millimetre(
    mortara: EcgRecording, mortara_svg: str
) -> None:
    """Each 0.2 mm of paper (8 samples at 1000 Hz) keeps its highest and lowest sample."""
    (rhythm,) = [g for g in lead_groups(parse(mortara_svg)) if g.get("data-strip") == "3"]
    offset = float(rhythm.get("data-offset-uv"))
    pts = np.array(trace_points(rhythm))
    uv = mortara.microvolts()[mortara.lead_names.index("II")][:10000] - offset
    per_bin = 8
    bins = uv.reshape(-1, per_bin)
    extremes = np.concatenate([np.argmax(bins, 1), np.argmin(bins, 1)]) + np.tile(np.arange(len(bins)) * per_bin, 2)
    want_x = 21.0 + np.round(extremes / 1000.0 * 250.0) / 10.0
    want_y = 180.0 - np.round(uv[extremes] / 10.0) / 10.0
    # x within 0.1 mm (a sample time exactly between two 0.1 mm steps may round either way)
    at_point = (np.abs(pts[None, :, 0] - want_x[:, None]) < 0.11) & (np.abs(pts[None, :, 1] - want_y[:, None]) < 0.01)
    a, b = pts[:-1], pts[1:]
    flat = np.abs(a[:, 1] - b[:, 1]) < 0.01
    on_flat = (
        flat[None, :]
        & (np.abs(a[None, :, 1] - want_y[:, None]) < 0.01)
        & (a[None, :, 0] <= want_x[:, None] + 0.01)
        & (b[None, :, 0] >= want_x[:, None] - 0.01)
    )
    missing = ~(at_point.any(1) | on_flat.any(1))
    assert not missing.any(), f"{missing.sum()} of {missing.size} extremes lost"


def test_trace_is_about_one_point_per_tenth_of_a_millimetre(mortara_svg: str) -> None:
    (rhythm,) = [g for g in lead_groups(parse(mortara_svg)) if g.get("data-strip") == "3"]
    pts = trace_points(rhythm)
    assert 1000 <= len(pts) <= 2600  # 250 mm of paper; 1000 Hz would be 10000 samples
    assert min(b[0] - a[0] for a, b in itertools.pairwise(pts)) >= 0  # time never runs backwards


def test_page_size_is_small(mortara_svg: str) -> None:
    size = len(mortara_svg.encode("utf-8"))
    assert size < 70_000, size


# ----------------------------------------------------------------------------- odd lead sets


def labels(svg: str) -> list[str]:
    return [g.find(SVG + "text").text.split(" ")[0] for g in lead_groups(parse(svg))]


def test_limb_leads_only_get_two_columns_and_derived_leads_an_asterisk() -> None:
    rec = recording("contec-50")
    svg = render_preview_svg(rec)
    assert labels(svg) == ["I*", "II", "III", "aVR*", "aVL*", "aVF*", "II"]
    groups = lead_groups(parse(svg))
    assert [float(g.get("data-seconds")) for g in groups] == [5.0] * 6 + [10.0]
    assert "未记录 not recorded: V1, V2, V3, V4, V5, V6" in svg
    assert "first 10 s of 47.3 s" in svg


def test_fifteen_leads_get_five_columns_of_two_seconds() -> None:
    base = recording("mortara-dicom")
    extra = np.stack([-base.lead("V3"), -base.lead("V4"), base.lead("V6")])
    rec = dataclasses.replace(
        base, samples=np.concatenate([base.samples, extra]), lead_names=STANDARD_12_LEADS + ("V7", "V3R", "V4R")
    )
    layout = plan_layout(rec.lead_names)
    assert layout.columns == 5 and layout.column_seconds == pytest.approx(2.0)
    assert labels(render_preview_svg(rec)) == [*STANDARD_12_LEADS, "V7", "V3R", "V4R", "II"]  # II: the rhythm strip


def test_eight_leads_with_right_and_posterior_chest_leads_are_labelled_as_recorded() -> None:
    base = recording("mortara-dicom")
    names = ("I", "II", "V1", "V2", "V3R", "V4", "V5", "V7")
    source = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    rec = dataclasses.replace(base, samples=base.samples[[base.lead_names.index(n) for n in source]], lead_names=names)
    assert labels(render_preview_svg(rec)) == ["I", "II", "V1", "V2", "V4", "V5", "V7", "V3R", "II"]


def test_three_leads_or_fewer_get_a_full_strip_each() -> None:
    base = recording("mortara-dicom")
    rec = dataclasses.replace(base, samples=base.samples[[6, 7]], lead_names=("V1", "V2"))
    groups = lead_groups(parse(render_preview_svg(rec)))
    assert [(g.get("data-lead"), float(g.get("data-seconds"))) for g in groups] == [("V1", 10.0), ("V2", 10.0)]


# ----------------------------------------------------------------------------- header and marks


def test_header_names_the_patient_in_chinese_and_states_rate_and_verdict(mortara_svg: str) -> None:
    texts = [t.text or "" for t in parse(mortara_svg).iter(SVG + "text")]
    assert "王秀英 (Wang Xiuying)" in texts
    assert any("女 F" in t and "ID 110105195403120021" in t for t in texts)
    assert any(t.startswith("心率 HR 61 次/分 bpm") and "25 mm/s" in t and "10 mm/mV" in t for t in texts)
    assert any("质量 Quality: 合格 acceptable" in t for t in texts)
    assert mortara_svg.startswith('<?xml version="1.0" encoding="UTF-8"?>')


def test_an_unassigned_ecg_to_record_again_is_previewed_in_the_consoles_words_at_the_clinics_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The preview sits under Today's ECG panel and is printed as it is: one SVG for the screen,
    the printer and `lastmile ecg preview`, so bilingual, Chinese first, in the words the panel
    above it uses (无患者, 需要重做), its time the clinic's wall clock as the panel shows it."""
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    recording = make_recording(7, patient=None)  # 2 s: record again; acquired 09:37 UTC
    texts = [t.text or "" for t in parse(render_preview_svg(recording)).iter(SVG + "text")]
    header = " | ".join(texts[:6])
    assert "无患者 no patient" in texts, header
    assert any("需要重做 record again" in t for t in texts), header
    assert any("采集 Acquired 2026-11-02 17:37+08:00" in t for t in texts), header


@pytest.mark.parametrize(
    "pn, shown",
    [
        ("王^小明", "王小明"),
        ("Wang^Xiaoming", "Wang Xiaoming"),
        ("Wang^Xiaoming=王^小明", "王小明 (Wang Xiaoming)"),
        ("", ""),
        ("Doe^John^Q", "Doe John Q"),
        ("欧阳^娜^娜", "欧阳娜娜"),  # family^given^middle: the parts, not a guess on spaces
        ("Wang Xiaoming", "Wang Xiaoming"),
        # free text (a FHIR report's reading doctor), one component: as written
        ("王 医生", "王 医生"),
        ("李明 (Li Ming)", "李明 (Li Ming)"),
        ("Zhang Wei, 陈静", "Zhang Wei, 陈静"),
        ("王小明 主治医师", "王小明 主治医师"),
    ],
)
def test_display_name(pn: str, shown: str) -> None:
    assert display_name(pn) == shown


def test_markup_in_names_is_text_not_markup() -> None:
    rec = dataclasses.replace(recording("mortara-dicom"), patient=Patient("P1", '<script>&amp;^"x"', None, ""))
    root = parse(render_preview_svg(rec))  # parses: nothing was injected
    assert not list(root.iter(SVG + "script"))


def test_problems_are_marked_on_their_leads() -> None:
    bad, _ = faults.electrode_off(recording("welch-allyn-scp"), np.random.default_rng(1), "V3", "blank")
    report = check_quality(bad)
    root = parse(render_preview_svg(bad, report))
    for g in lead_groups(root):
        marked = g.find(SVG + "rect") is not None
        assert marked == (g.get("data-lead") == "V3"), g.get("data-lead")
        if marked:
            assert "脱落 off" in g.find(SVG + "text").text
    texts = [t.text or "" for t in root.iter(SVG + "text")]
    assert "• V3 电极脱落，请重新贴好后重做" in texts and "V3 electrode off: reattach and record again" in texts
    assert any("需要重做 record again" in t for t in texts)


def test_an_svg_renderer_draws_the_page(tmp_path: Path, mortara_svg: str) -> None:
    tool = require_tool("rsvg-convert")
    src, png = tmp_path / "ecg.svg", tmp_path / "ecg.png"
    src.write_text(mortara_svg, encoding="utf-8")
    subprocess.run(
        [tool, "-d", "96", "-p", "96", "-b", "white", str(src), "-o", str(png)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (round(297 / 25.4 * 96), round(210 / 25.4 * 96))


# ----------------------------------------------------------------------------- on paper

MM_PER_PT = 25.4 / 72.0
MINOR_GRID_RGB = b".9569 .7765 .7765 RG"  # #f4c6c6, the 1 mm lines, as Chromium writes the colour


def chromium_print(svg: str, folder: Path) -> bytes:
    """The page printed by Debian's Chromium with its default print settings (what Ctrl+P gives)."""
    from tests.console_browser import CHROMIUM, CHROMIUM_FLAGS

    if not Path(CHROMIUM).exists():
        missing(f"{CHROMIUM} is not installed (scripts/setup.sh --test installs chromium)")
    src, pdf = folder / "ecg.svg", folder / "ecg.pdf"
    src.write_text(svg, encoding="utf-8")
    subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={folder / 'profile'}", f"--print-to-pdf={pdf}", src.as_uri()],
        check=True,
        capture_output=True,
        timeout=180,
    )
    return pdf.read_bytes()


def page_size_mm(pdf: bytes) -> tuple[float, float]:
    (box,) = set(re.findall(rb"/MediaBox\s*\[([^\]]*)\]", pdf))
    x0, y0, x1, y1 = (float(v) for v in box.split())
    return (x1 - x0) * MM_PER_PT, (y1 - y0) * MM_PER_PT


def minor_grid_on_paper(pdf: bytes) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The 1 mm grid lines as printed: each line's two ends in millimetres on the sheet, found by
    following the content stream's transformations (q, Q, cm) from SVG units to PDF points."""
    streams = [zlib.decompress(s) for s in re.findall(rb"stream\r?\n(.*?)endstream", pdf, re.S) if s[:1] == b"x"]
    (content,) = [c for c in streams if MINOR_GRID_RGB in c]
    content = re.sub(rb"<[0-9A-Fa-f\s]*>|\((?:\\.|[^\\)])*\)", b" ", content)  # text: no geometry in it
    ctm, saved, operands = np.eye(3), [], []
    colour, start = b"", np.zeros(3)
    lines = []
    for token in re.findall(rb"-?(?:\d+\.?\d*|\.\d+)|[A-Za-z*'\"]+", content):
        if token[0] not in b"-.0123456789":
            if token == b"q":
                saved.append(ctm)
            elif token == b"Q":
                ctm = saved.pop()
            elif token == b"cm":
                a, b, c, d, e, f = operands
                ctm = np.array([[a, b, 0], [c, d, 0], [e, f, 1]]) @ ctm
            elif token == b"RG":
                colour = b" ".join(b"%g" % v for v in operands)
            elif token in (b"m", b"l") and colour == b"0.9569 0.7765 0.7765":
                point = np.array([*operands, 1.0]) @ ctm * MM_PER_PT
                if token == b"l":
                    lines.append(((start[0], start[1]), (point[0], point[1])))
                start = point
            operands = []
        else:
            operands.append(float(token))
    return lines


def test_printed_page_is_a4_landscape_at_25_mm_per_s_and_10_mm_per_mv(tmp_path: Path, mortara_svg: str) -> None:
    """The console says the page prints at true scale: measured on the PDF Chromium prints, the
    sheet is A4 landscape and the 1 mm grid is 1 mm apart on paper (25 mm = 1 s, 10 mm = 1 mV)."""
    pdf = chromium_print(mortara_svg, tmp_path)
    assert page_size_mm(pdf) == pytest.approx((297.0, 210.0), abs=0.2)
    lines = minor_grid_on_paper(pdf)
    columns = sorted({round(a[0], 2) for a, b in lines if abs(a[0] - b[0]) < 0.01})
    rows = sorted({round(a[1], 2) for a, b in lines if abs(a[1] - b[1]) < 0.01})
    assert len(columns) == 220 and len(rows) == 128  # 275 x 160 mm less the 5 mm lines
    assert min(np.diff(columns)) == pytest.approx(1.0, abs=0.02)
    assert min(np.diff(rows)) == pytest.approx(1.0, abs=0.02)
    assert columns[-1] - columns[0] == pytest.approx(273.0, rel=1e-3)  # 1 mm to 274 mm: 10.92 s
    assert rows[-1] - rows[0] == pytest.approx(158.0, rel=1e-3)  # 15.8 mV
