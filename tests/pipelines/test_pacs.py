"""A PACS in and out (pipelines.dicom.pacs): ``ctseverity run dicomweb+http://... --study UID --store`` against a
real Orthanc with its DICOMweb plugin.

The module starts Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``; .ci/run installs them) with a
config of its own in a temporary folder: HTTP on a free port with remote access refused (Orthanc 1.10 has no
bind address: a client other than 127.0.0.1 gets 403), the DICOM server off, storage in the folder,
authentication on with a test user whose password reaches ``ctseverity`` through the environment only. Orthanc
is stopped at the end, also on failure. Only 127.0.0.1 is ever contacted.

Orthanc is loaded with one study of three series made from the 24-slice crop of a real COVID-19 CT
(``dicom_crop_series``, with a patient name, ID and birth date in its headers): the 1.25 mm series itself, a
2.5 mm series of every other slice, and a localizer. ``ctseverity run`` pulls the study, chooses the 1.25 mm
series (the rule and the series left out are logged), grades it as ``ctseverity run`` grades the same series
read from disk, and with ``--store`` sends the SEG, SR and overview capture back: Orthanc then holds them under
the study, the SR with the same grade. No output but the DICOM ones, and no console line, holds the patient's
identifiers or the password. A rerun with the credentials in a netrc file and the study found by a QIDO date
query resumes: nothing graded or stored twice. With ``--keep-identifiers`` the log and results.csv name the
patient. Bad credentials, credentials in the URL and a study without a
usable series are refused in one line. The series choice (the rule a DICOM folder's series is chosen by, here
from headers) and the privacy helpers are tested on their own too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from monai_ext.errors import CTSeverityError
from pipelines.cli import main
from pipelines.dicom import dicomweb
from pipelines.dicom.pacs import choose_study_series
from pipelines.dicom.privacy import RedactIdentifiers, identifier_strings, patient_identifiers

USER = "ctsev-test"
LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _dicomweb_plugin() -> str:
    """The DICOMweb plugin where the Debian package puts it (``dpkg -L orthanc-dicomweb``)."""
    if shutil.which("dpkg") is None or shutil.which("Orthanc") is None:
        pytest.fail("Orthanc not found: install the Debian packages orthanc and orthanc-dicomweb (.ci/run does)",
                    pytrace=False)
    proc = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=30)
    plugins = [ln for ln in proc.stdout.splitlines() if "/plugins/" in ln and ln.endswith(".so")]
    if proc.returncode != 0 or not plugins:
        pytest.fail(f"the orthanc-dicomweb package is not installed ({proc.stderr.strip()})", pytrace=False)
    return plugins[0]


class Orthanc:
    """A running Orthanc: its REST root, DICOMweb input, credentials and the REST calls the tests make."""

    def __init__(self, port: int, password: str, log: Path) -> None:
        self.rest = f"http://{LOOPBACK}:{port}"
        self.input = f"dicomweb+http://{LOOPBACK}:{port}/dicom-web"
        self.password = password
        self.auth = (USER, password)
        self.log = log

    def get(self, path: str):
        r = requests.get(self.rest + path, auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("Content-Type", "") else r.content

    def upload(self, ds: pydicom.Dataset) -> None:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        r = requests.post(self.rest + "/instances", data=buf.getvalue(), auth=self.auth, timeout=30)
        r.raise_for_status()

    def series_of(self, study_uid: str) -> list[dict]:
        """The series of a study: MainDicomTags plus ``ID`` and ``Instances`` (Orthanc identifiers)."""
        found = requests.post(self.rest + "/tools/lookup", data=study_uid, auth=self.auth, timeout=30).json()
        (study,) = [f["ID"] for f in found if f["Type"] == "Study"]
        return [{**s["MainDicomTags"], "ID": s["ID"], "Instances": s["Instances"]}
                for s in self.get(f"/studies/{study}/series")]

    def instance(self, orthanc_id: str) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(self.get(f"/instances/{orthanc_id}/file")))

    def env(self) -> dict:
        """The environment of a ``ctseverity`` run that may log in (the password only here)."""
        return {**os.environ, "OMP_NUM_THREADS": "1", dicomweb.ENV_USER: USER, dicomweb.ENV_PASSWORD: self.password}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Orthanc:
    """Orthanc with the DICOMweb plugin on a free 127.0.0.1 port, authentication on, stopped at the end."""
    root = tmp_path_factory.mktemp("orthanc")
    port, password = _free_port(), secrets.token_urlsafe(16)
    config = {
        "Name": "ctseverity-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": port, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password}, "DicomServerEnabled": False, "DicomPort": _free_port(),
        "HttpThreadsCount": 4, "ConcurrentJobs": 1, "SaveJobs": False, "StorageCompression": False,
        "Plugins": [_dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = root / "orthanc.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=root)
    server = Orthanc(port, password, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc stopped at start:\n{log.read_text()[-3000:]}", pytrace=False)
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{server.rest}/dicom-web/studies", auth=server.auth, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc's DICOMweb did not answer in 60 s:\n{log.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _series_copy(files: list[Path], description: str, number: int, **tags) -> list[pydicom.Dataset]:
    """The slices ``files`` as a new series of the same study (new series and instance UIDs, real pixels)."""
    series_uid = generate_uid()
    out = []
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, description
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        for key, value in tags.items():
            setattr(ds, key, value)
        out.append(ds)
    return out


@pytest.fixture(scope="module")
def pacs_study(orthanc, dicom_crop_series) -> dict:
    """The crop's study in Orthanc with three series: the 1.25 mm crop, 2.5 mm slices, a localizer."""
    series, identifiers = dicom_crop_series
    files = sorted(series.iterdir())
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    for f in files:
        orthanc.upload(pydicom.dcmread(f))
    for ds in _series_copy(files[::2], "thick 2.5 mm", 3, SliceThickness="2.5"):
        orthanc.upload(ds)
    for ds in _series_copy(files[12:13], "scout", 1, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]):
        orthanc.upload(ds)
    assert {int(s["SeriesNumber"]) for s in orthanc.series_of(first.StudyInstanceUID)} == {1, 2, 3}
    return {"study": str(first.StudyInstanceUID), "series": str(first.SeriesInstanceUID), "folder": series,
            "identifiers": identifiers, "date": str(first.StudyDate)}


def _ctseverity(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "ctseverity"  # a process of its own: its log lines are its output
    return subprocess.run([str(exe), *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=300, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def graded(orthanc, pacs_study, tmp_path_factory) -> dict:
    """``ctseverity run`` on the crop read from disk, then on its study pulled from Orthanc with --store."""
    work = tmp_path_factory.mktemp("pacs_run")
    disk = _ctseverity(["-q", "run", str(pacs_study["folder"]), "--out", str(work / "disk"), "--method", "hirescam",
                        "--device", "cpu"], {**os.environ, "OMP_NUM_THREADS": "1"}, work)
    assert disk.returncode == 0, disk.stdout + disk.stderr
    out = work / "out"
    proc = _ctseverity(["--debug", "run", orthanc.input, "--study", pacs_study["study"], "--out", str(out),
                        "--method", "hirescam", "--device", "cpu", "--store"], orthanc.env(), work)
    console = proc.stdout + proc.stderr
    (work / "console.txt").write_text(console, encoding="utf-8")
    assert proc.returncode == 0, console
    uid = pacs_study["study"]
    return {"out": out, "study_dir": out / uid, "console": console,
            "result": json.loads((out / uid / "result.json").read_text()),
            "disk": json.loads((work / "disk" / pacs_study["folder"].name / "result.json").read_text())}


def test_pull_grade_push_finds_seg_and_sr_in_orthanc_with_the_grade_of_the_disk_run(orthanc, pacs_study, graded):
    result, disk = graded["result"], graded["disk"]
    assert result["status"] == "ok" and result["study"] == pacs_study["study"]
    assert result["grade"] == disk["grade"] and result["grade"] != "CT-0"
    assert result["lesion_percent"] == pytest.approx(disk["lesion_percent"], abs=1e-6)
    assert result["lung_volume_ml"] == pytest.approx(disk["lung_volume_ml"], abs=1e-6)
    # the series graded is the 1.25 mm one, retrieved whole
    pulled = graded["out"] / "pacs" / pacs_study["study"]
    assert len(list(pulled.glob("*.dcm"))) == 24
    assert {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in pulled.glob("*.dcm")} == {
        pacs_study["series"]}
    # Orthanc holds the SEG, SR and overview capture under the study
    by_modality = {s["Modality"]: s for s in orthanc.series_of(pacs_study["study"])}
    assert {"CT", "SEG", "SR", "OT"} <= set(by_modality), by_modality.keys()
    local_seg = pydicom.dcmread(graded["study_dir"] / "dicom" / "seg.dcm")
    (seg_id,) = by_modality["SEG"]["Instances"]
    seg = orthanc.instance(seg_id)
    assert seg.SOPInstanceUID == local_seg.SOPInstanceUID and seg.StudyInstanceUID == pacs_study["study"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pacs_study["series"]
    assert np.array_equal(seg.pixel_array, local_seg.pixel_array)
    (sr_id,) = by_modality["SR"]["Instances"]
    sr = hd.sr.srread(io.BytesIO(orthanc.get(f"/instances/{sr_id}/file")))
    (lesion,) = [g for g in sr.content.get_volumetric_roi_measurement_groups() if g.tracking_identifier == "lesion"]
    assert lesion.get_qualitative_evaluations()[0].value.value == disk["grade"]
    assert str(seg.PatientID) == pacs_study["identifiers"]["PatientID"]  # DICOM outputs keep the patient
    record = json.loads((graded["out"] / "pacs.json").read_text())["studies"][pacs_study["study"]]
    assert record["series"] == pacs_study["series"] and record["status"] == "ok"
    (capture_id,) = by_modality["OT"]["Instances"]
    capture = orthanc.instance(capture_id)
    assert sorted(record["stored"]) == sorted([seg.SOPInstanceUID, sr.SOPInstanceUID, capture.SOPInstanceUID])


def test_the_series_rule_is_logged_with_each_series_left_out(pacs_study, graded):
    console = graded["console"]
    assert f"2 CT series in the study: read series 2 'ROUTINE CHEST NON-CON' ({pacs_study['series']}) (1.25 mm " \
           "slices" in console
    assert "then the thinnest slices" in console  # the rule
    assert "left out series 3 'thick 2.5 mm'" in console and "thicker slices" in console
    assert "left out series 1 'scout'" in console and "a localizer (scout)" in console


def test_no_identifier_or_password_outside_the_dicom_files(orthanc, pacs_study, graded, find_identifiers):
    ids = pacs_study["identifiers"]
    found, checked = find_identifiers([*graded["out"].rglob("*"), graded["out"].parent / "console.txt"], ids,
                                      extra=(orthanc.password,))
    assert found == []
    assert checked >= 9  # results.csv, report.html, pacs.json, result.json, overview.png, three NIfTI, console
    pulled = next((graded["out"] / "pacs" / pacs_study["study"]).glob("*.dcm")).read_bytes()
    assert ids["PatientID"].encode() in pulled  # the scan above would have seen them


def test_rerun_from_a_date_query_with_netrc_credentials_resumes(orthanc, pacs_study, graded, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {LOOPBACK} login {USER} password {orthanc.password}\n")
    netrc.chmod(0o600)
    env = {k: v for k, v in orthanc.env().items() if not k.startswith("CTSEVERITY_DICOMWEB")}
    env.update(NETRC=str(netrc), HOME=str(tmp_path))
    before = {s["Modality"]: len(s["Instances"]) for s in orthanc.series_of(pacs_study["study"])}
    date = pacs_study["date"]
    proc = _ctseverity(["run", orthanc.input, "--study-date", f"{date}-{date}", "--out", str(graded["out"]),
                        "--method", "hirescam", "--device", "cpu", "--store"], env, tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    assert "credentials: netrc" in console and "1 studies" in console
    assert "series already retrieved" in console and "1 already complete" in console
    assert "stored on" in console and "already" in console
    assert {s["Modality"]: len(s["Instances"]) for s in orthanc.series_of(pacs_study["study"])} == before
    with open(graded["out"] / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["study"] for r in rows] == [pacs_study["study"]] and "patient_id" not in rows[0]


def test_keep_identifiers_in_a_pacs_run_names_the_patient(orthanc, pacs_study, tmp_path):
    ids = pacs_study["identifiers"]
    proc = _ctseverity(["run", orthanc.input, "--study", pacs_study["study"], "--out", str(tmp_path / "out"),
                        "--method", "density", "--keep-identifiers"], orthanc.env(), tmp_path)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    assert f"patient ID {ids['PatientID']}, name {ids['PatientName']}, born {ids['PatientBirthDate']}" in console
    with open(tmp_path / "out" / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["study"], row["patient_id"]) == (pacs_study["study"], ids["PatientID"])
    assert orthanc.password not in console


def test_access_refused_and_credentials_in_the_url_are_one_line_errors(orthanc, pacs_study, tmp_path, monkeypatch,
                                                                       capsys):
    for key in (dicomweb.ENV_USER, dicomweb.ENV_PASSWORD, dicomweb.ENV_TOKEN):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["-q", "run", orthanc.input, "--study", pacs_study["study"], "--out", str(tmp_path / "out"), "--method",
            "density"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "HTTP 401" in err and dicomweb.ENV_USER in err and len(err.splitlines()) == 1, err
    monkeypatch.setenv(dicomweb.ENV_USER, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, "not-the-password")
    assert main(args) == 2 and "HTTP 401" in capsys.readouterr().err
    url = orthanc.input.replace("http://", f"http://{USER}:{orthanc.password}@")
    assert main(["-q", "run", url, "--study", pacs_study["study"], "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "credentials do not go into the URL" in captured.err
    assert orthanc.password not in captured.err + captured.out
    assert main(["-q", "run", str(pacs_study["folder"]), "--study", pacs_study["study"], "--out", str(tmp_path)]) == 2
    assert "need one DICOMweb input" in capsys.readouterr().err


def test_a_study_without_a_series_to_grade_fails_alone(orthanc, pacs_study, dicom_crop_series, tmp_path,
                                                       monkeypatch, capsys):
    """A study holding only a localizer: refused in one line with the reason (exit code 2: no study to grade),
    nothing stored into it."""
    series, _ = dicom_crop_series
    study_uid = generate_uid()
    for ds in _series_copy(sorted(series.iterdir())[:1], "scout only", 1, StudyInstanceUID=study_uid,
                           StudyDate="19990101", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]):
        orthanc.upload(ds)
    monkeypatch.setenv(dicomweb.ENV_USER, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, orthanc.password)
    assert main(["-q", "run", orthanc.input, "--study", study_uid, "--out", str(tmp_path / "out"), "--store"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no study could be retrieved" in err and f"{study_uid}: no CT image series" in err and "a localizer" in err
    assert len(err.splitlines()) == 1, err
    assert [s["Modality"] for s in orthanc.series_of(study_uid)] == ["CT"]


# --- the series rule and the privacy helpers on their own --------------------------------------------------


def _headers(files: list[Path], uid: str, **tags) -> list[pydicom.Dataset]:
    """Headers of ``files`` as series ``uid``, as WADO-RS metadata gives them (an empty Pixel Data element)."""
    out = []
    tags.setdefault("SeriesDescription", "")
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ds.SeriesInstanceUID, ds.PixelData = uid, b""
        for key, value in tags.items():
            setattr(ds, key, value)
        out.append(ds)
    return out


def test_the_series_of_a_study_is_chosen_by_the_folder_rule_from_headers(dicom_crop_series):
    series, _ = dicom_crop_series
    files = sorted(series.iterdir())
    headers = {
        "1.1": _headers(files[:1], "1.1", SeriesNumber=1, SeriesDescription="scout",
                        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        "1.2": _headers(files, "1.2", SeriesNumber=2),
        "1.3": _headers(files[::2], "1.3", SeriesNumber=3, SliceThickness="2.5"),
        "1.4": _headers(files[:12], "1.4", SeriesNumber=4, SliceThickness="0.6"),  # thinner, 15 of the 30 mm
        "1.5": _headers(files, "1.5", SeriesNumber=5, ImageOrientationPatient=[1, 0, 0, 0, 0, -1]),
        "1.6": _headers(files[:6], "1.6", SeriesNumber=6),
        "1.7": _headers(files, "1.7", SeriesNumber=7),
        "1.8": _headers(files[:1], "1.8", SeriesNumber=8, Modality="SR"),
    }
    chosen, message, left_out = choose_study_series(headers, "9.9")
    assert chosen.uid == "1.2" and chosen.n_slices == 24 and chosen.thickness_mm == 1.25
    assert message.startswith("6 CT series in the study: read series 2 (1.2) (1.25 mm slices")
    for part in ("series 3 (1.3): thicker slices", "series 4 (1.4): covers 15 mm of the 30 mm",
                 "series 5 (1.5): not axial", "series 6 (1.6): 6 slice position(s), fewer than 10",
                 "series 7 (1.7): a higher series number"):
        assert part in message, (part, message)
    assert sorted(left_out) == ["series 1 'scout' (1.1): a localizer (scout)", "series 8 (1.8): modality SR, not CT"]
    with pytest.raises(CTSeverityError, match=r"no CT image series \(series 1 'scout' \(1.1\): a localizer"):
        choose_study_series({"1.1": headers["1.1"]}, "9.9")
    with pytest.raises(CTSeverityError, match="no CT series fit for the lungs.*not axial"):
        choose_study_series({"1.5": headers["1.5"]}, "9.9")


def test_identifiers_are_read_and_redacted_from_log_lines(dicom_crop_series):
    series, identifiers = dicom_crop_series
    ids = patient_identifiers(series)
    assert ids == {"name": identifiers["PatientName"], "id": identifiers["PatientID"],
                   "birth_date": identifiers["PatientBirthDate"]}
    assert patient_identifiers(series.parent / "nothing") == {}
    flt = RedactIdentifiers(identifier_strings(ids))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "patient %s born %s (%s)", (ids["id"], "1938-05-17",
                                                                                          "JOHANNA"), None)
    assert flt.filter(record) and record.getMessage() == "patient [redacted] born [redacted] ([redacted])"


def test_keep_identifiers_puts_them_in_results_csv_and_result_json(dicom_crop_series, tmp_path):
    series, identifiers = dicom_crop_series
    out = tmp_path / "out"
    assert main(["-q", "run", str(series), "--out", str(out), "--method", "density", "--keep-identifiers"]) == 0
    result = json.loads((out / series.name / "result.json").read_text())
    assert result["patient"] == {"name": identifiers["PatientName"], "id": identifiers["PatientID"],
                                 "birth_date": identifiers["PatientBirthDate"]}
    with open(out / "results.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["patient_id"], row["patient_name"], row["patient_birth_date"]) == (
        identifiers["PatientID"], identifiers["PatientName"], identifiers["PatientBirthDate"])
    # without the flag the study is graded again (another fingerprint) and the identifiers are gone
    assert main(["-q", "run", str(series), "--out", str(out), "--method", "density"]) == 0
    assert "patient" not in json.loads((out / series.name / "result.json").read_text())
    assert identifiers["PatientID"] not in (out / "results.csv").read_text()


def test_credentials_come_from_the_environment_then_netrc(tmp_path):
    url = "http://pacs.example.org:8042/dicom-web"
    auth, source = dicomweb.credentials(url, {dicomweb.ENV_USER: "u", dicomweb.ENV_PASSWORD: "p"})
    assert (auth.username, auth.password, source) == ("u", "p", "$CTSEVERITY_DICOMWEB_USER")
    auth, source = dicomweb.credentials(url, {dicomweb.ENV_TOKEN: "t0k", dicomweb.ENV_USER: "u",
                                              dicomweb.ENV_PASSWORD: "p"})
    assert source == "$CTSEVERITY_DICOMWEB_TOKEN" and "t0k" not in repr(auth)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example.org login nu password np\n")
    netrc.chmod(0o600)
    auth, source = dicomweb.credentials(url, {"NETRC": str(netrc)})
    assert (auth.username, auth.password, source) == ("nu", "np", f"netrc {netrc}")
    assert dicomweb.credentials("http://other.example.org/", {"NETRC": str(netrc)}) == (None, "none")
    with pytest.raises(ValueError, match="set both"):
        dicomweb.credentials(url, {dicomweb.ENV_USER: "u"})
    with pytest.raises(ValueError, match="credentials do not go into the URL") as info:
        dicomweb.server_url("dicomweb+http://u:secret@pacs.example.org/dicom-web")
    assert "secret" not in str(info.value)
    assert dicomweb.server_url("dicomweb+https://pacs.example.org/dicom-web/") == "https://pacs.example.org/dicom-web"
    assert dicomweb.check_study_date("2020-03-01-2020-03-31") == "20200301-20200331"
    with pytest.raises(ValueError, match="--study-date"):
        dicomweb.check_study_date("March 2020")
