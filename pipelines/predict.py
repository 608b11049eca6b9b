"""Lesion probability per study (and per slice) with a bundle's classifier, written to CSV, and the plain text
tables the commands print; the command is :mod:`pipelines.commands.predict`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from monai_ext.errors import CTSeverityError
from monai_ext.io import atomic_write_text
from pipelines.bundle import load_model
from pipelines.classify import classify_study
from pipelines.discovery import find_studies

__all__ = ["format_table", "predict_to_csv"]


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """A plain text table with aligned columns."""
    cells = [[str(h) for h in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def predict_to_csv(inputs: str | Sequence[str], output_dir: str | Path, bundle: str | Path | None = None,
                   device: str | object = "cpu", lung_backend: str = "auto") -> Path:
    """Slice and study probabilities of every study in ``inputs``, written to ``output_dir``.

    Writes ``predictions.csv`` (study, path, status, lesion_probability, slices, error) and
    ``slice_predictions.csv`` (study, slice, lesion_probability). Used by the bundle's inference config.
    """
    out = Path(output_dir)
    studies = find_studies([inputs] if isinstance(inputs, (str, Path)) else list(inputs))
    model = load_model(bundle, device=str(device))
    study_rows = ["study,path,status,lesion_probability,slices,error"]
    slice_rows = ["study,slice,lesion_probability"]
    for st in tqdm(studies, desc="classifying", unit="study"):
        try:
            res = classify_study(st.path, model, lung_backend=lung_backend)
        except CTSeverityError as exc:
            study_rows.append(f'{st.study},"{st.path}",failed,,,"{exc.reason}"')
            continue
        study_rows.append(f'{st.study},"{st.path}",ok,{res.probability:.6f},{len(res.stack)},')
        slice_rows += [f"{st.study},{int(z)},{float(p):.6f}" for z, p in zip(res.stack.indices, res.slice_probs)]
    atomic_write_text(out / "predictions.csv", "\n".join(study_rows) + "\n")
    atomic_write_text(out / "slice_predictions.csv", "\n".join(slice_rows) + "\n")
    return out / "predictions.csv"
