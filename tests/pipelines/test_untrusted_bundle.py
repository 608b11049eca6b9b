"""Untrusted bundles and paths: a bundle from elsewhere gives its weights and a plain MONAI network only
(no ``_target_`` or ``$`` expression of its own runs unless ``--trust-bundle``), and study names from
manifests and DICOM headers never write outside ``--out``.

Each attack is real: the configs and the pickle below would create a marker file if they ran.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import pydicom
import pytest
import torch

from monai_ext.errors import UntrustedBundleError
from pipelines.bundle import EMBEDDED_BUNDLE, check_bundle, load_model, sha256_file
from pipelines.cli import main
from pipelines.discovery import Study, find_studies, is_safe_study_name, safe_study_name


def _copy_bundle(tmp_path: Path, name: str = "downloaded") -> Path:
    dst = tmp_path / name
    shutil.copytree(EMBEDDED_BUNDLE / "models", dst / "models")
    shutil.copytree(EMBEDDED_BUNDLE / "configs", dst / "configs")
    return dst


def _edit_model_json(bundle: Path, **changes) -> None:
    path = bundle / "models" / "model.json"
    info = json.loads(path.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))


def _network_def(**extra) -> dict:
    info = json.loads((EMBEDDED_BUNDLE / "models" / "model.json").read_text())
    return {**info["network_def"], **extra}


def _marker_expr(marker: Path) -> str:
    return f"$open({str(marker)!r}, 'w').write('ran') and 0.0"


def test_a_copied_bundle_loads_without_trust_and_predicts_as_the_embedded_one(tmp_path):
    bundle = _copy_bundle(tmp_path)
    assert check_bundle(bundle) == bundle
    untrusted, embedded = load_model(bundle), load_model()
    x = torch.rand(2, 1, 192, 192)
    with torch.no_grad():
        assert torch.equal(untrusted.network(x), embedded.network(x))
    assert untrusted.iba_estimator is not None


@pytest.mark.parametrize("case", ["target", "expression", "nested_target", "reference", "macro", "debug_mode",
                                  "pretrained", "weights_outside", "estimator_outside"])
def test_an_untrusted_bundle_asking_for_more_is_refused_and_runs_nothing(tmp_path, case):
    bundle = _copy_bundle(tmp_path)
    marker = tmp_path / "marker"
    network = {
        "target": {"_target_": "pathlib.Path.touch", "self": str(marker)},
        "expression": _network_def(dropout_prob=_marker_expr(marker)),
        "nested_target": _network_def(act={"_target_": "pathlib.Path.touch", "self": str(marker)}),
        "reference": _network_def(growth_rate="@growth"),
        "macro": _network_def(growth_rate="%/etc/passwd#root"),
        "debug_mode": _network_def(_mode_="debug"),
        "pretrained": {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 2, "in_channels": 1,
                       "out_channels": 2, "pretrained": True},
    }.get(case)
    if network is not None:
        _edit_model_json(bundle, network_def=network)
    elif case == "weights_outside":
        shutil.move(bundle / "models" / "model.pt", tmp_path / "model.pt")
        _edit_model_json(bundle, weights="../../model.pt")
    else:
        _edit_model_json(bundle, iba_estimator="/etc/hostname")
    with pytest.raises(UntrustedBundleError) as err:
        load_model(bundle)
    with pytest.raises(UntrustedBundleError):
        check_bundle(bundle)
    assert not marker.exists()
    if case in ("target", "expression", "nested_target"):
        assert "--trust-bundle" in str(err.value)


def test_trust_bundle_runs_the_config_as_code(tmp_path):
    """The same expression runs with ``trust``: the refusal above is what stopped it."""
    bundle = _copy_bundle(tmp_path)
    marker = tmp_path / "marker"
    _edit_model_json(bundle, network_def=_network_def(dropout_prob=_marker_expr(marker)))
    model = load_model(bundle, trust=True)
    assert marker.read_text() == "ran"
    assert check_bundle(bundle, trust=True) == bundle
    assert model.network.training is False


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_with_a_matching_checksum_is_not_unpickled(tmp_path, capsys):
    """The bundle's author controls the checksum too: the weights are read with weights_only, even with trust."""
    bundle = _copy_bundle(tmp_path)
    marker = tmp_path / "pwned"
    weights = bundle / "models" / "model.pt"
    with open(weights, "wb") as fh:
        pickle.dump({"features.conv0.weight": _Payload(marker)}, fh, protocol=2)
    _edit_model_json(bundle, sha256=sha256_file(weights))
    for trust in (False, True):
        with pytest.raises(Exception, match="not the weights of its network") as err:
            load_model(bundle, trust=trust)
        assert str(weights) in str(err.value)
    assert not marker.exists()


def test_cli_refuses_an_untrusted_bundle_in_one_line(tmp_path, capsys):
    bundle = _copy_bundle(tmp_path)
    marker = tmp_path / "marker"
    _edit_model_json(bundle, network_def=_network_def(dropout_prob=_marker_expr(marker)))
    study = tmp_path / "study.nii.gz"
    study.write_bytes(b"")  # never read: the bundle is refused first
    truth = tmp_path / "truth.csv"
    truth.write_text("study,lesion_percent\nstudy,10\n")
    calibrate = ["calibrate", str(study), "--truth", str(truth), "--bundle", str(bundle), "--method", "hirescam",
                 "--dry-run"]
    for argv in (["predict", str(study), "--bundle", str(bundle)],
                 ["run", str(study), "--out", str(tmp_path / "out"), "--bundle", str(bundle), "--method", "hirescam"],
                 calibrate):
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("ctseverity")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "model.json" in lines[0] and "--trust-bundle" in lines[0] and "dropout_prob" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out" / "study").exists()
    assert main([*calibrate, "--trust-bundle"]) != 0  # the study is empty; the bundle's config ran first
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("command", ["run", "predict", "evaluate", "demo", "train", "calibrate"])
def test_help_says_what_trust_bundle_allows(capsys, command):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--trust-bundle" in text
    assert "code" in text.rsplit("--trust-bundle", 1)[1][:400]


def test_train_refuses_foreign_configs_in_out(tmp_path):
    from pipelines.train import train_bundle

    out = _copy_bundle(tmp_path, "out")
    marker = tmp_path / "marker"
    cfg = out / "configs" / "train.json"
    cfg.write_text(cfg.read_text().replace('"imports": [', f'"imports": [\n        "{_marker_expr(marker)}",', 1))
    with pytest.raises(UntrustedBundleError, match="configs/train.json"):
        train_bundle(tmp_path / "no_data", out, epochs=1)
    assert not marker.exists()


# -- paths ------------------------------------------------------------------------------------------------

ESCAPES = ["../../escaped", "../", "..", ".", "/tmp/ctsev_abs_escape", "a/../../b", "sub/dir/name", "..\\..\\win",
           "C:\\Windows\\x", ".hidden", "CON", "nul.txt", "name\x00with nul", "new\nline", "tab\there",
           "\u202egnp.exe", "Müller, Anna", "x" * 400, "  ", "\u00e9t\u0301e"]


@pytest.mark.parametrize("name", ESCAPES)
def test_safe_study_name_is_one_plain_folder_name(tmp_path, name):
    safe = safe_study_name(name)
    assert is_safe_study_name(safe)
    assert safe and len(safe) <= 100 and not safe.startswith(".") and safe not in (".", "..")
    assert not any(c in safe for c in '/\\:*?"<>|\x00\n\t\u202e')
    target = (tmp_path / safe).resolve()
    assert target.parent == tmp_path.resolve()
    target.mkdir()  # a real folder can be made with it
    with pytest.raises(ValueError, match="unsafe study name"):
        if safe != name:
            Study(name, "x")
        else:
            raise ValueError("unsafe study name (the name was safe already)")


def test_safe_names_keep_letters_and_long_names_apart():
    assert safe_study_name("Müller, Anna") == "Müller, Anna"
    assert safe_study_name("LIDC-IDRI-0001") == "LIDC-IDRI-0001"
    assert safe_study_name("a" * 300) != safe_study_name("a" * 301)


def _write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "study"])
        w.writerows(rows)
    return path


def _files_outside(root: Path, out: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and out not in p.parents]


def test_manifest_study_names_never_write_outside_out(tmp_path, tiny_studies, capsys):
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    studies = sorted(tiny_studies.glob("*.nii.gz"))[:3]
    names = ["../../escaped", "/tmp/ctsev_abs_escape", "../../escaped"]  # the third collides with the first
    manifest = _write_manifest(work / "manifest.csv", [(str(p), n) for p, n in zip(studies, names)])
    found = find_studies([manifest])
    assert [s.study for s in found] == ["escaped", "tmp_ctsev_abs_escape", "escaped_1"]
    out = work / "out"
    before = set(tmp_path.rglob("*"))
    code = main(["-q", "run", str(manifest), "--out", str(out), "--method", "density", "--no-dicom-out"])
    capsys.readouterr()
    assert code == 0
    new = set(tmp_path.rglob("*")) - before
    assert new and all(p == out or out in p.parents for p in new), sorted(map(str, new - {out}))
    assert not Path("/tmp/ctsev_abs_escape").exists()
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"escaped", "tmp_ctsev_abs_escape", "escaped_1"}
    with open(out / "results.csv", newline="") as fh:
        assert sorted(r["study"] for r in csv.DictReader(fh)) == ["escaped", "escaped_1", "tmp_ctsev_abs_escape"]


def test_dicom_headers_and_folder_names_never_write_outside_out(tmp_path, dicom_crop_series, capsys):
    """A series folder named '..'-like and headers holding path fragments: every output stays in --out."""
    src, _ = dicom_crop_series
    series = tmp_path / "in" / ".. ..%2F..\u202e"
    series.mkdir(parents=True)
    for k, f in enumerate(sorted(src.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.PatientID = "../../../escaped_pid"
        ds.SeriesDescription = "/tmp/ctsev_series_escape"
        ds.StudyDescription = "..\\..\\escaped"
        ds.save_as(series / f"{k:03d}.dcm")
    out = tmp_path / "out"
    before = set(tmp_path.rglob("*"))
    code = main(["-q", "run", str(series), "--out", str(out), "--method", "density"])
    capsys.readouterr()
    assert code == 0
    new = set(tmp_path.rglob("*")) - before
    assert all(p == out or out in p.parents for p in new), sorted(map(str, new))
    (study,) = [p for p in out.iterdir() if p.is_dir()]
    assert study.name == "%2F" and is_safe_study_name(study.name)
    assert (study / "result.json").is_file() and (study / "dicom" / "seg.dcm").is_file()
    assert not Path("/tmp/ctsev_series_escape").exists()


class _Server:
    """A DICOMweb client whose study query answers what a hostile or broken server could."""

    _ctseverity_root = "http://pacs.test/dicom-web"

    def __init__(self, uids: list[str]) -> None:
        self.uids = uids

    def search_for_studies(self, search_filters=None, fields=None, limit=None, offset=0):
        return [{"0020000D": {"vr": "UI", "Value": [u]}} for u in self.uids[offset:offset + limit]]


def test_study_uids_from_a_server_query_never_name_a_path(caplog):
    """A PACS run names each study's folders by its Study Instance UID: one from a query that is not a UID
    is skipped with a logged reason."""
    from pipelines.dicom.dicomweb import find_studies as query

    answers = ["1.2.840.113619.2.55.3", "../../escaped", "/tmp/ctsev_abs_escape", "1.2.3/../..", "1.2.3\\x", "",
               "1.2." + "9" * 80, "1.2.840.113619.2.55.3", "2.25.1"]
    with caplog.at_level("ERROR", logger="pipelines.dicom.dicomweb"):
        assert query(_Server(answers), study_date="20200301") == ["1.2.840.113619.2.55.3", "2.25.1"]
    assert caplog.text.count("not a Study Instance UID") == 6 and "'../../escaped'" in caplog.text


def test_instance_uids_from_a_server_never_name_a_path(tmp_path, dicom_crop_series):
    """Retrieved instances are written as <SOPInstanceUID>.dcm: one whose UID is a path is refused, nothing is
    written outside the series folder."""
    from pipelines.dicom.dicomweb import DicomwebError, retrieve_series

    src, _ = dicom_crop_series
    good, bad = (pydicom.dcmread(f) for f in sorted(src.glob("*.dcm"))[:2])
    bad.SOPInstanceUID = "../../escaped"

    class Client(_Server):
        def iter_series(self, study_uid, series_uid, media_types=None):
            yield from self.instances

    client = Client([])
    folder = tmp_path / "pacs" / "1.2.3"
    client.instances = [good]
    assert retrieve_series(client, "1.2.3", "1.2.3.4", folder) == [folder / f"{good.SOPInstanceUID}.dcm"]
    client.instances = [bad]
    with pytest.raises(DicomwebError, match="SOP Instance UID '../../escaped' is not a DICOM UID"):
        retrieve_series(client, "1.2.3", "1.2.3.4", folder)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == [
        Path("pacs/1.2.3") / f"{good.SOPInstanceUID}.dcm"]
