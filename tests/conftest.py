"""Shared fixtures.

Real data comes from ``../shared/data`` relative to the repository root, or from the folder named
by ``CTSEVERITY_SHARED_DATA``. A test that needs a file that is not there fails (it never skips):
under CI the data must be present.
"""

from __future__ import annotations

import contextlib
import locale
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

#: the character type locale at start (C.UTF-8 on CI): text files, pipes and logs are UTF-8
_START_CTYPE = locale.setlocale(locale.LC_CTYPE)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Each test starts in the locale the session started in: a library that switches the C locale's character
    type to ASCII in one test (seen on CI: 'ANSI_X3.4-1968' in later tests under LANG=C.UTF-8) made later tests'
    text I/O without an explicit encoding fail on the progress bars' block characters."""
    if locale.setlocale(locale.LC_CTYPE) != _START_CTYPE:
        locale.setlocale(locale.LC_CTYPE, _START_CTYPE)


REPO_ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """One torch thread inside the block: on a shared, busy machine, spinning OpenMP threads make
    small models several times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def torch_single_thread():
    """:func:`single_torch_thread`, for session fixtures: ``with torch_single_thread(): ...``."""
    return single_torch_thread


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run the test with one torch thread (see :func:`single_torch_thread`)."""
    with single_torch_thread():
        yield


def shared_data_dir() -> Path:
    """The shared data folder (``CTSEVERITY_SHARED_DATA`` or ``../shared/data``)."""
    return Path(os.environ.get("CTSEVERITY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """Path of a shared data file; fails the test when it is missing."""
    path = shared_data_dir() / relative
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (set CTSEVERITY_SHARED_DATA)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def real_ct_path() -> Path:
    """The real chest CT, 512x512x141 int16 HU NIfTI."""
    return shared_file("chest_ct_itkelastix_00/chest_ct_00.nii.gz")


@pytest.fixture(scope="session")
def lidc_dicom_path() -> Path:
    """One real chest CT slice as a DICOM file."""
    return shared_file("lidc_slice_lungmask/lidc_slice_0.dcm")


def load_script(name: str):
    """The module of ``scripts/<name>.py`` (scripts are not a package; registered in ``sys.modules`` so that
    its dataclasses and pickling work)."""
    import importlib.util
    import sys

    key = f"ctsev_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[key]


@pytest.fixture(scope="session")
def script():
    """``script("make_semisynthetic")`` gives the module of that script."""
    return load_script


@pytest.fixture(scope="session")
def shared():
    """``shared("folder/file")`` gives the path of a shared data file, failing if it is missing."""
    return shared_file


@pytest.fixture(scope="session")
def real_semisynthetic(real_ct_path, tmp_path_factory):
    """The real chest CT with COVID-19-like lesions inserted at about 0, 10, 30, 60 and 80 % of lung volume.

    Returns the folder (``truth.csv``, ``<study>.nii.gz``, ``<study>_lesion.nii.gz``, ``<study>_lung.nii.gz``)
    and the written records. Made once per test session (lesions from ``monai_ext.data``).
    """
    from monai_ext.data.studies import write_studies

    out = tmp_path_factory.mktemp("real_semisynthetic")
    records = write_studies(out, [0, 10, 30, 60, 80], base=real_ct_path, seed=2024, masks=True,
                            lung_backend="threshold", prefix="real", progress=False)
    return out, records


@pytest.fixture(scope="session")
def small_real_ct(real_ct_path):
    """The real chest CT every 4th pixel and 3rd slice: ``(volume, affine)``, int16 HU (128, 128, 47) in voxel
    index order (i, j, k) with its 3.9 x 3.9 x 6 mm affine; the whole chest, lung clear of the first and last
    slice. Read only: tests copy it before changing it."""
    import nibabel as nib

    img = nib.load(str(real_ct_path))
    vol = np.asarray(img.dataobj)[::4, ::4, ::3].astype(np.int16)
    vol.setflags(write=False)
    return vol, img.affine @ np.diag([4.0, 4.0, 3.0, 1.0])


#: patient identifiers written into the headers of :func:`dicom_crop_series` (no output but DICOM may hold them)
TEST_IDENTIFIERS = {"PatientName": "Privacytest^Johanna", "PatientID": "PID-84736251", "PatientBirthDate": "19380517"}


@pytest.fixture(scope="session")
def dicom_crop_series(tmp_path_factory) -> tuple[Path, dict]:
    """A real DICOM CT series: 24 contiguous slices (1.25 mm, JPEG Lossless, 512x512) of the RICORD COVID-19
    series through its lesions, with a patient name, ID and birth date written into every header.

    Returns the folder and the identifiers (:data:`TEST_IDENTIFIERS`). Read only.
    """
    import pydicom

    from monai_ext.io.reader import dicom_series

    (files,) = dicom_series(shared_file("ricord_1a_000082_covid/dicom")).values()
    out = tmp_path_factory.mktemp("dicom_crop") / "chest_series"
    out.mkdir()
    for k, name in enumerate(files[140:164]):  # position order; the lesions lie in slices 116-195
        ds = pydicom.dcmread(name)
        for key, value in TEST_IDENTIFIERS.items():
            setattr(ds, key, value)
        ds.save_as(out / f"slice_{k:03d}.dcm")
    return out, dict(TEST_IDENTIFIERS)


def identifier_leaks(paths, identifiers: dict, extra: tuple[str, ...] = ()) -> tuple[list, int]:
    """Where patient identifiers (and ``extra`` strings) occur in the files of ``paths`` that are not DICOM
    (``.dcm``); gzip files are read decompressed. Returns ``([(path, string), ...], files checked)``."""
    import gzip

    needles = [identifiers["PatientID"], identifiers["PatientBirthDate"],
               f"{identifiers['PatientBirthDate'][:4]}-{identifiers['PatientBirthDate'][4:6]}-"
               f"{identifiers['PatientBirthDate'][6:]}", *identifiers["PatientName"].split("^"), *extra]
    found, checked = [], 0
    for path in paths:
        path = Path(path)
        if not path.is_file() or path.suffix == ".dcm":
            continue
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        found += [(path, n) for n in needles if n.encode() in data]
        checked += 1
    return found, checked


@pytest.fixture(scope="session")
def find_identifiers():
    """:func:`identifier_leaks`: ``find_identifiers(paths, identifiers, extra=())``."""
    return identifier_leaks


def write_ct_series(vol: np.ndarray, folder: Path, slices: list[tuple[int, float]], pixel_mm: float = 3.9,
                    uid: str = "1.2.826.0.1.3680043.2.1125.77") -> Path:
    """Write a DICOM CT series of ``vol``'s (i, j, k) slices into ``folder``: one file per
    ``(slice index, position along z in mm)``, axial, int16 HU."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    steps = np.diff(sorted(z for _, z in slices))
    step = float(np.median(steps[steps > 0])) if (steps > 0).any() else 1.0  # the Spacing Between Slices tag
    for k, (i, z) in enumerate(slices):
        sl = sitk.GetImageFromArray(np.ascontiguousarray(vol[:, :, i].T[None]).astype(np.int16))
        sl.SetSpacing((pixel_mm, pixel_mm, step))
        sl.SetOrigin((0.0, 0.0, z))
        tags = {"0008|0060": "CT", "0020|000d": f"{uid}.0", "0020|000e": uid, "0020|0013": str(k + 1),
                "0020|0032": f"0\\0\\{z:.3f}", "0020|0037": "1\\0\\0\\0\\1\\0", "0008|0018": f"{uid}.{k + 1}",
                "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


@pytest.fixture(scope="session")
def ct_series():
    """:func:`write_ct_series`: ``ct_series(vol, folder, [(slice index, z mm), ...])`` writes a DICOM series."""
    return write_ct_series


def _dciodvfy_errors(path: str | os.PathLike) -> list[str]:
    """The error lines of dciodvfy (dicom3tools) on ``path``; fails when dciodvfy is not installed."""
    import shutil
    import subprocess

    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install the Debian package dicom3tools (.ci/run does)", pytrace=False)
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any(ln.strip() in ("Segmentation", "Comprehensive3DSR", "CTImage", "SCImage") for ln in lines), lines
    return [ln for ln in lines if ln.startswith("Error")]


@pytest.fixture(scope="session")
def dciodvfy():
    """``dciodvfy(path)`` gives the error lines of dicom3tools' validator on a DICOM file (none: valid)."""
    return _dciodvfy_errors
