"""The installable package: a wheel built from the project's files carries the embedded bundle and works from a
fresh virtual environment, away from the checkout.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation``) from a copy of the project's files,
installed with ``--no-deps`` into a new virtual environment that sees this environment's packages (torch,
MONAI, ...) through a ``.pth`` line but not the checkout, and run from a temporary folder: ``ctseverity
predict`` and ``ctseverity run --method hirescam`` on a real DICOM series, ``ctseverity demo``, and ``python -m
monai.bundle run`` with the installed bundle's ``inference.json``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "ct_severity"
#: what a wheel is built from (pyproject.toml's packages, the bundle and the readme)
PROJECT_FILES = ("pyproject.toml", "README.md", "monai_ext", "pipelines", "bundles")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("wheel_src")
    for name in PROJECT_FILES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w",
          str(dist)], cwd=dist, env=env)
    (built,) = dist.glob("ct_severity-*.whl")
    return built


def test_wheel_carries_the_embedded_bundle(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    bundle_files = {p.relative_to(BUNDLE).as_posix() for p in BUNDLE.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert {"configs/inference.json", "configs/metadata.json", "models/model.pt", "models/model.json",
            "docs/README.md", "docs/licenses/LICENSE_CIP.txt", "docs/licenses/README.md"} <= bundle_files
    missing = sorted(f for f in bundle_files if f"ct_severity/{f}" not in names)
    assert not missing, f"bundle files missing from the wheel: {missing}"
    assert "pipelines/dicom/seg.py" in names and "monai_ext/io/reader.py" in names


def test_editable_install_finds_the_bundle_in_the_checkout():
    """The README installs the checkout editable (``pip install -e``): the embedded bundle is the checkout's."""
    from pipelines import EMBEDDED_LUNG_NET, embedded_bundle
    from pipelines.bundle import EMBEDDED_BUNDLE, bundle_path

    checkout = BUNDLE.resolve()
    assert embedded_bundle().resolve() == EMBEDDED_BUNDLE.resolve() == bundle_path().resolve() == checkout
    assert EMBEDDED_LUNG_NET.parent.resolve() == checkout / "models"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """A new virtual environment with the wheel installed; it reuses this environment's packages."""
    root = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(root)
    python = root / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root, env=dict(os.environ)).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    assert str(REPO_ROOT) not in deps
    (site / "_ctseverity_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
                "PATH": f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"})
    env.pop("CTSEVERITY_BUNDLE", None)
    # pip from the reused packages, run by the new interpreter, installs into the new environment
    _run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)], cwd=root,
         env=env)
    return root, env


def test_installed_wheel_predicts_runs_demos_and_runs_the_bundle_config(installed, dicom_crop_series, tmp_path):
    root, env = installed
    series, _ = dicom_crop_series
    work = tmp_path / "work"  # neither the checkout nor anything above it
    work.mkdir()
    python, ctseverity = root / "bin" / "python", root / "bin" / "ctseverity"
    where = json.loads(_run([str(python), "-c", (
        "import json, pipelines, monai_ext, highdicom; from pipelines.bundle import EMBEDDED_BUNDLE, load_model; "
        "m = load_model(); print(json.dumps([pipelines.__file__, monai_ext.__file__, str(EMBEDDED_BUNDLE), "
        "str(m.bundle), pipelines.__version__]))")], cwd=work, env=env).stdout)
    site = (root / "lib").resolve()
    for path in where[:4]:
        assert Path(path).resolve().is_relative_to(site), (path, where)
    assert where[4] != "0.0.0+unknown"

    predicted = _run([str(ctseverity), "predict", str(series)], cwd=work, env=env).stdout
    row = next(ln.split() for ln in predicted.splitlines() if ln.startswith(series.name))
    probability = float(row[1])
    assert 0.0 <= probability <= 1.0 and row[2] == "24", predicted

    out = tmp_path / "run"
    _run([str(ctseverity), "-q", "run", str(series), "--out", str(out), "--method", "hirescam"], cwd=work, env=env)
    result = json.loads((out / series.name / "result.json").read_text())
    assert result["status"] == "ok" and result["method"] == "hirescam"
    assert Path(result["model"]["bundle"]).resolve().is_relative_to(site)
    assert result["grade"] != "CT-0" and result["lesion_volume_ml"] > 0, result
    assert (out / series.name / result["outputs"]["dicom_seg"]).exists()

    demo = tmp_path / "demo"
    _run([str(ctseverity), "-q", "demo", "--out", str(demo), "--studies", "2", "--method", "hirescam"], cwd=work,
         env=env)
    with open(demo / "results.csv", newline="") as fh:
        demo_rows = list(csv.DictReader(fh))
    assert [r["status"] for r in demo_rows] == ["ok", "ok"] and (demo / "report.html").exists()
    for row in demo_rows:
        demo_result = json.loads((demo / row["study"] / "result.json").read_text())
        assert Path(demo_result["model"]["bundle"]).resolve().is_relative_to(site)

    by_bundle = tmp_path / "bundle_run"
    bundle_root = Path(where[2])
    _run([str(python), "-m", "monai.bundle", "run", "--config_file", str(bundle_root / "configs" / "inference.json"),
          "--bundle_root", str(bundle_root), "--dataset_dir", str(series.parent), "--output_dir", str(by_bundle),
          "--method", "hirescam", "--device", "$torch.device('cpu')"], cwd=work, env=env)
    with open(by_bundle / "results.csv", newline="") as fh:
        (bundle_row,) = list(csv.DictReader(fh))
    assert bundle_row["status"] == "ok" and bundle_row["grade"] == result["grade"]
    bundle_result = json.loads((by_bundle / series.name / "result.json").read_text())
    assert Path(bundle_result["model"]["bundle"]).resolve().is_relative_to(site)
    assert float(bundle_row["lesion_percent"]) == pytest.approx(result["lesion_percent"], abs=0.01)
