"""The ECG worker: one DICOM ECG on stdin, its quality report and preview as JSON on stdout.

    python -m lastmile.console.ecg_worker < ecg.dcm

It runs in its own short-lived process because numpy, pydicom and the analysis take about
40 MB that the long-lived console must not keep (its budget is 64 MB), and because bad bytes
can then never take the console down. Output: {"quality": QualityReport.to_dict(), "svg": ...}
or {"error": "..."}; the exit code is 0 either way (1 only for a crash).
"""

from __future__ import annotations

import json
import sys


def analyse(payload: bytes) -> dict:
    from devices.ecg.formats import decode_ecg
    from devices.ecg.quality import check_quality
    from devices.errors import DeviceError
    from lastmile.clock import local_zone
    from lastmile.ecg.preview import render_preview_svg

    try:
        recording = decode_ecg(payload, "item.dcm", local_tz=local_zone())
        report = check_quality(recording)
        svg = render_preview_svg(recording, report)
    except DeviceError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"quality": report.to_dict(), "svg": svg}


def main() -> int:
    result = analyse(sys.stdin.buffer.read())
    sys.stdout.write(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
