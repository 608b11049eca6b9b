"""``ctseverity predict``: lesion probability per study (and per slice) with a bundle's classifier."""

from __future__ import annotations

import argparse
import sys

from tqdm.auto import tqdm

from monai_ext.errors import CTSeverityError
from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS
from pipelines.bundle import load_model
from pipelines.classify import classify_study
from pipelines.discovery import find_studies
from pipelines.predict import format_table

__all__ = ["register", "run_predict"]


def run_predict(args: argparse.Namespace) -> int:
    studies = find_studies(args.inputs)
    model = load_model(args.bundle, device=args.device, trust=args.trust_bundle)
    # the bundle's calibrated study call (the study probability below which run grades CT-0), else 0.5
    call = float(model.calibration.get("study_call") or 0.5)
    rows, slice_rows, failed = [], [], 0
    for st in tqdm(studies, desc="classifying", unit="study", disable=len(studies) < 2):
        try:
            res = classify_study(st.path, model, lung_backend=args.lung_mask)
        except CTSeverityError as exc:
            failed += 1
            rows.append([st.study, "failed", "-", exc.reason])
            continue
        rows.append([st.study, res.probability, len(res.stack), "lesion" if res.probability >= call else "no lesion"])
        if args.slices:
            slice_rows += [[st.study, int(z), float(p)] for z, p in zip(res.stack.indices, res.slice_probs)]
    print(format_table(["study", "lesion_probability", "slices", f"call (at {call:g})"], rows))
    if args.slices and slice_rows:
        print()
        print(format_table(["study", "slice", "lesion_probability"], slice_rows))
    if failed:
        print(f"{failed} of {len(studies)} studies failed", file=sys.stderr)
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.commands.run import add_bundle_options

    p = sub.add_parser("predict", help="lesion probability per study with the slice classifier",
                       description="Classify the lung slices of each study and print one row per study.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="study file, DICOM series folder, folder of studies, or CSV manifest")
    add_bundle_options(p)
    p.add_argument("--slices", action="store_true", help="also print one row per slice")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--lung-mask", dest="lung_mask", default="auto", choices=LUNG_BACKENDS)
    p.set_defaults(func=run_predict)
