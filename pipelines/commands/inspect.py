"""``ctseverity inspect``: check that inputs are readable chest CT and show their geometry."""

from __future__ import annotations

import argparse

import nibabel as nib
import numpy as np
import torch

from monai_ext.io import lung_extent_warnings, read_ct
from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS
from pipelines.discovery import find_studies
from pipelines.predict import format_table

__all__ = ["register", "run_inspect"]


def run_inspect(args: argparse.Namespace) -> int:
    rows, warnings = [], []
    for st in find_studies(args.inputs):
        # raises a CTSeverityError naming the input
        ct, report = read_ct(st.path, series_uid=args.series_uid, orientation=None)
        arr = ct[0].as_tensor().reshape(-1)
        sample = arr[:: max(1, arr.numel() // 1_000_000)].float()
        p1, p99 = torch.quantile(sample, torch.tensor([0.01, 0.99])).tolist()
        row = [st.study, "x".join(str(int(s)) for s in ct.shape[1:]),
               "x".join(f"{float(s):.3g}" for s in ct.pixdim), "".join(nib.aff2axcodes(ct.affine.numpy())),
               f"{p1:.0f}..{p99:.0f}"]
        if args.lung:
            from monai_ext.transforms import LungMask

            lung = LungMask(backend=args.lung_mask)(ct)
            ml = float((lung > 0).sum()) * float(np.prod(ct.pixdim.numpy())) / 1000.0
            row.append(f"{ml:.0f}")
            mask = np.asarray(lung[0]) > 0
            report.check_lung(mask)
            report.warnings.extend(lung_extent_warnings(mask, ct.pixdim.tolist()))
        rows.append(row)
        warnings += [f"warning: {st.study}: {w}" for w in report.warnings]
    header = ["study", "shape", "spacing_mm", "axes", "hu_p1..p99"] + (["lung_ml"] if args.lung else [])
    print(format_table(header, rows))
    for line in warnings:  # what the input checks repaired or found suspicious (docs/input_rules.md)
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="check that inputs are readable chest CT and show their geometry",
                       description="Load each study (file, DICOM folder, folder of studies, manifest), check "
                                   "that it is a CT volume in HU, and print its grid and intensity range.")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--lung", action="store_true", help="also segment the lungs and print their volume")
    p.add_argument("--lung-mask", dest="lung_mask", default="auto", choices=LUNG_BACKENDS)
    p.add_argument("--series", dest="series_uid", metavar="UID",
                   help="the DICOM series to read in a folder holding several (default: the axial CT series fit for "
                        "the lungs; the choice is printed as a warning)")
    p.set_defaults(func=run_inspect)
