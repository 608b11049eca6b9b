"""report.html in a real browser: headless Chromium (Debian package ``chromium``) opens it offline, prints it on A4.

A small batch (three phantom studies and a truncated file, ``--method density --lung-mask threshold``) is run,
and its report is opened from disk with every host name unresolvable and the network log on: no console
message, no request beyond the file itself; the 1280x900 screenshot is not blank; every image is embedded and
each study's thumbnail and name link to its own ``overview.png``. Printed to PDF, every page is A4 (595x842 pt),
the summary, the agreement with truth and the study table take one page each, and the table keeps all its
columns at full size (its text read back from the PDF); a table of 25 studies goes on over A4 pages with its
headers on each and no row split. A page with an external script, font and image and a script error shows that
these checks see what they look for.

Chromium is required, as dciodvfy is for the DICOM tests: without it the tests fail, naming the package.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A4 in PostScript points, as Chromium writes it (594.96 x 841.92)
A4_PT = (595.0, 842.0)
WINDOW = (1280, 900)
STUDIES = ("synth_000_f00", "synth_001_f20", "synth_002_f45")


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium not found: install the Debian package chromium (.ci/run does)", pytrace=False)
    return exe


def _open(page: Path, work: Path, *action: str) -> tuple[list[str], list[str]]:
    """Open ``page`` in headless Chromium with ``action`` (``--screenshot=...`` or ``--print-to-pdf=...``), offline.

    Returns:
        The console messages (script errors, refused loads, ``console.*`` calls) and the URLs of the
        requests the page made over the network (the browser's own background requests left out).
    """
    work.mkdir(parents=True, exist_ok=True)
    netlog = work / "netlog.json"
    cmd = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={work / 'profile'}", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}",
           *action, page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [e["params"]["url"] for e in log["events"] if e["type"] == start_job
                and e.get("params", {}).get("initiator") not in (None, "not an origin")]  # the browser's own
    return console, requests


# --- a PDF read back: pages, MediaBox, text runs with position and size (Chromium's Skia writer only) -------------

_OBJ = re.compile(rb"(\d+)\s+0\s+obj\b")
_TOKEN = re.compile(rb"<<|>>|<[0-9A-Fa-f\s]*>|\[|\]|/[^\s/\[\]<>()]+|\((?:\\.|[^\\)])*\)"
                    rb"|[-+]?(?:\d+\.?\d*|\.\d+)|[A-Za-z'\"*]+")


def _pdf_objects(data: bytes) -> dict[int, tuple[bytes, bytes | None]]:
    """``{number: (dictionary, decoded stream or None)}``."""
    objs = {}
    for m in _OBJ.finditer(data):
        body = data[m.end():data.find(b"endobj", m.end())]
        stream = None
        s = body.find(b"stream")
        if s >= 0 and b"/Length" in body[:s]:
            length = int(re.search(rb"/Length\s+(\d+)", body[:s]).group(1))
            begin = m.end() + s + len(b"stream")
            begin += 2 if data[begin:begin + 2] == b"\r\n" else 1
            stream = data[begin:begin + length]
            if b"/FlateDecode" in body[:s]:
                stream = zlib.decompress(stream)
            body = body[:s]
        objs[int(m.group(1))] = (body, stream)
    return objs


def _ref(body: bytes, key: bytes) -> int | None:
    m = re.search(rb"/" + key + rb"\s+(\d+)\s+0\s+R", body)
    return int(m.group(1)) if m else None


def _to_unicode(cmap: bytes) -> dict[int, str]:
    out = {}
    for block in re.findall(rb"beginbfchar(.*?)endbfchar", cmap, re.S):
        for src, dst in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>", block):
            out[int(src, 16)] = bytes.fromhex(dst.decode()).decode("utf-16-be")
    for block in re.findall(rb"beginbfrange(.*?)endbfrange", cmap, re.S):
        for lo, hi, dst in re.findall(rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>", block):
            for k, code in enumerate(range(int(lo, 16), int(hi, 16) + 1)):
                out[code] = chr(int(dst, 16) + k)
    return out


def _mul(m, n):
    """The matrix ``m`` applied first, then ``n`` (PDF's row-vector convention)."""
    a, b, c, d, e, f = m
    return (a * n[0] + b * n[2], a * n[1] + b * n[3], c * n[0] + d * n[2], c * n[1] + d * n[3],
            e * n[0] + f * n[2] + n[4], e * n[1] + f * n[3] + n[5])


def _pdf_pages(path: Path) -> list[dict]:
    """Per page in order: ``mediabox`` and ``runs``, one ``(text, x0, x1, y, size)`` per text block (BT..ET), in
    points from the top left; ``x1`` is where its last glyph starts, ``size`` the font size as printed."""
    data = path.read_bytes()
    objs = _pdf_objects(data)
    root = _ref(objs[_ref(data[data.rfind(b"trailer"):], b"Root")][0], b"Pages")

    def leaves(n: int) -> list[int]:
        body = objs[n][0]
        if not re.search(rb"/Type\s*/Pages\b", body):
            return [n]
        kids = re.search(rb"/Kids\s*\[([^\]]*)\]", body).group(1)
        return [p for k in re.findall(rb"(\d+)\s+0\s+R", kids) for p in leaves(int(k))]

    pages = []
    for n in leaves(root):
        body = objs[n][0]
        box = tuple(float(v) for v in re.search(rb"/MediaBox\s*\[([^\]]*)\]", body).group(1).split())
        fonts = {}
        font_dict = re.search(rb"/Font\s*<<(.*?)>>", body, re.S)
        for name, ref in re.findall(rb"/(\w+)\s+(\d+)\s+0\s+R", font_dict.group(1) if font_dict else b""):
            cmap = _ref(objs[int(ref)][0], b"ToUnicode")
            fonts[name.decode()] = _to_unicode(objs[cmap][1]) if cmap else {}
        contents = re.search(rb"/Contents\s*(\[[^\]]*\]|\d+\s+0\s+R)", body).group(1)
        stream = b"\n".join(objs[int(k)][1] for k in re.findall(rb"(\d+)\s+0\s+R", contents))
        runs, ctm, saved, font, size, operands, arrays, block = [], (1, 0, 0, 1, 0, 0), [], {}, 0.0, [], [], None
        line = (1, 0, 0, 1, 0, 0)
        for tok in _TOKEN.findall(stream):
            if tok == b"[":
                arrays.append(operands)
                operands = []
            elif tok == b"]":
                inner, operands = operands, arrays.pop()
                operands.append(inner)
            elif tok[:1] in b"<(/" or tok == b">>" or re.fullmatch(rb"[-+]?[\d.]+", tok):
                operands.append(tok)
            else:
                nums = [float(v) for v in operands if isinstance(v, bytes) and re.fullmatch(rb"[-+]?[\d.]+", v)]
                if tok == b"q":
                    saved.append(ctm)
                elif tok == b"Q":
                    ctm = saved.pop()
                elif tok == b"cm":
                    ctm = _mul(tuple(nums[-6:]), ctm)
                elif tok == b"BT":
                    line, block = (1, 0, 0, 1, 0, 0), None
                elif tok == b"Tf":
                    font, size = fonts.get(operands[-2][1:].decode(), {}), nums[-1]
                elif tok == b"Tm":
                    line = tuple(nums[-6:])
                elif tok == b"Td":
                    line = _mul((1, 0, 0, 1, nums[-2], nums[-1]), line)
                elif tok in (b"Tj", b"TJ"):
                    strings = operands[-1] if tok == b"TJ" else [operands[-1]]
                    text = ""
                    for s in strings:
                        if isinstance(s, bytes) and s.startswith(b"<"):
                            h = re.sub(rb"\s", b"", s[1:-1]).decode()
                            text += "".join(font.get(int(h[i:i + 4], 16), "\ufffd") for i in range(0, len(h), 4))
                    m = _mul(line, ctm)
                    if block is None:
                        block = [text, m[4], m[4], box[3] - m[5], size * math.hypot(m[2], m[3])]
                        runs.append(block)
                    else:
                        block[0] += text
                        block[2] = m[4]
                elif tok == b"ET":
                    block = None
                operands = []
        pages.append({"mediabox": box, "runs": [tuple(r) for r in runs]})
    return pages


# --- the tests ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tiny_studies, tmp_path_factory):
    """``ctseverity run`` on three phantom studies and a truncated file, with truth: the batch folder."""
    work = tmp_path_factory.mktemp("report_browser")
    inputs = work / "in"
    inputs.mkdir()
    for p in tiny_studies.iterdir():
        shutil.copy(p, inputs / p.name)
    (inputs / "broken.nii.gz").write_bytes((inputs / f"{STUDIES[0]}.nii.gz").read_bytes()[:4000])
    out = work / "out"
    rc = main(["-q", "run", str(inputs), "--out", str(out), "--method", "density", "--lung-mask", "threshold",
               "--truth", str(inputs / "truth.csv")])
    assert rc == 1  # the truncated file failed, the others are graded
    return out


def test_report_needs_nothing_but_its_folder(small_run):
    """Every image is embedded, every link is a study's own overview.png next to the report, nothing else
    is referred to, and the page forbids loading anything else."""
    text = (small_run / "report.html").read_text()
    srcs = re.findall(r"\bsrc=['\"]([^'\"]*)", text)
    hrefs = re.findall(r"\bhref=['\"]([^'\"]*)", text)
    urls = re.findall(r"url\(([^)]*)\)", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not urls and "@import" not in text and "<script" not in text.lower()
    assert "http-equiv='Content-Security-Policy'" in text and "default-src 'none'" in text
    links = [h for h in hrefs if not h.startswith("data:")]
    assert sorted(links) == sorted(f"{s}/overview.png" for s in STUDIES for _ in "ab")  # thumbnail and name
    for h in links:
        target = small_run / urllib.parse.unquote(h)
        assert target.is_file() and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", h
    assert "@page{size:A4" in text


def test_report_renders_offline_without_console_errors(small_run, tmp_path):
    shot = tmp_path / "report.png"
    console, requests = _open(small_run / "report.html", tmp_path / "chromium",
                              f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert console == [] and requests == []
    with Image.open(shot) as im:
        assert im.size == WINDOW
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.02, "the screenshot is blank"


def test_report_prints_on_a4_with_whole_tables(small_run, tmp_path):
    pdf = tmp_path / "report.pdf"
    console, requests = _open(small_run / "report.html", tmp_path / "chromium", "--no-pdf-header-footer",
                              f"--print-to-pdf={pdf}")
    assert console == [] and requests == []
    pages = _pdf_pages(pdf)
    assert len(pages) == 3  # summary and grade chart; agreement with truth; the study table
    for page in pages:
        x0, y0, x1, y1 = page["mediabox"]
        assert (x0, y0) == (0, 0) and abs(x1 - A4_PT[0]) < 1 and abs(y1 - A4_PT[1]) < 1, page["mediabox"]
        assert all(0 < r[1] and r[2] < A4_PT[0] - 20 and 0 < r[3] < A4_PT[1] for r in page["runs"]), page["runs"]

    def words(page):
        return "".join(r[0] for r in page["runs"]).replace(" ", "")

    title = [r for r in pages[0]["runs"] if r[0] == "ct-severity report"]
    assert len(title) == 1 and abs(title[0][4] - 15) < 0.2  # 15 pt as set: the page was not shrunk to fit
    assert "Grades" in words(pages[0]) and "Agreementwithtruth" in words(pages[1])
    table = words(pages[2])
    for header in ("overview", "study", "status", "grade", "truegrade", "lesion%", "true%", "lungml", "lesionml",
                   "lesions", "method", "seconds"):
        assert header in table, header
    for study in (*STUDIES, "broken"):
        assert study in table, study
    assert "failed" in table and "truncated" in table and table.count("density") == 3 + 1  # the failure's method
    rows = [r for r in pages[2]["runs"] if r[0] in STUDIES]
    assert len(rows) == 3 and min(r[4] for r in rows) >= 7.5  # readable: 8 pt
    seconds = [r for r in pages[2]["runs"] if r[0] == "seconds"]
    assert seconds and seconds[0][2] < A4_PT[0] - 28  # the last column inside the right margin (10 mm)


def test_a_long_study_table_prints_page_after_page(tmp_path):
    """25 studies (written as a run leaves them, without running one), a DICOM UID as a name, warnings: the table
    goes on over several A4 pages, each with the column headers, no row split, no page shrunk to fit."""
    from pipelines.batch import collect_rows
    from pipelines.report import write_report

    out = tmp_path / "out"
    names = [f"study_{k:02d}" for k in range(24)] + ["1.2.826.0.1.3680043.8.498.1234567890123456789012345678901"]
    warning = "200 NaN/infinite voxels inside the body (0.07 % of it, on 34 slices) filled by interpolation"
    for k, name in enumerate(names):
        (out / name).mkdir(parents=True)
        Image.fromarray(np.full((400, 960, 3), 40 + 8 * k, np.uint8)).save(out / name / "overview.png")
        result = {"study": name, "input": f"/data/{name}", "status": "ok", "method": "hirescam",
                  "lesion_percent": 2.0 * k, "grade": "CT-1" if k else "CT-0", "lung_volume_ml": 4000.0,
                  "lesion_volume_ml": 80.0 * k, "n_lesions": k, "timings_s": {"total": 3.5},
                  "warnings": [warning] if k % 5 == 0 else []}
        (out / name / "result.json").write_text(json.dumps(result))
    pdf = tmp_path / "report.pdf"
    write_report(out, collect_rows(out))
    console, requests = _open(out / "report.html", tmp_path / "chromium", "--no-pdf-header-footer",
                              f"--print-to-pdf={pdf}")
    assert console == [] and requests == []
    pages = _pdf_pages(pdf)
    table_pages = [p for p in pages if any(r[0].startswith("study_") for r in p["runs"])]
    assert len(table_pages) >= 2 and pages[-1] is table_pages[-1]
    for page in pages:
        assert all(abs(a - b) < 1 for a, b in zip(page["mediabox"][2:], A4_PT))
        assert max(r[2] for r in page["runs"]) < A4_PT[0] - 28  # inside the right margin
    for page in table_pages:
        assert sum(r[0] == "seconds" for r in page["runs"]) == 1  # the header row on every page of the table
    assert [r for r in pages[0]["runs"] if r[0] == "ct-severity report"][0][4] == pytest.approx(15, abs=0.2)
    names_on = [{r[0] for r in p["runs"]} for p in table_pages]
    for k, name in enumerate(names[:-1]):  # each row whole on one page: its name, file name and lesion volume
        on = [i for i, words in enumerate(names_on) if name in words]
        assert len(on) == 1 and f"{80.0 * k:.1f}" in names_on[on[0]], name
    assert names[-1] in "".join(r[0] for p in table_pages for r in p["runs"])  # wrapped in its column, not cut


def test_the_browser_checks_see_external_resources_and_errors(tmp_path):
    """A page that loads a script, a web font and an image from the network, and has a script error."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'>"
                    "<link rel='stylesheet' href='https://fonts.example.org/css?family=Roboto'>"
                    "<script src='https://cdn.example.org/lib.js'></script></head><body>"
                    "<img src='http://images.example.org/a.png'><script>undefinedFunction();</script></body></html>")
    console, requests = _open(page, tmp_path / "chromium", f"--screenshot={tmp_path / 'bad.png'}",
                              "--window-size=400,300")
    assert any("Uncaught ReferenceError" in ln for ln in console), console
    assert {urllib.parse.urlsplit(u).hostname for u in requests} == {"fonts.example.org", "cdn.example.org",
                                                                     "images.example.org"}, requests
