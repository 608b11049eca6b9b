"""``ctseverity calibrate``: fit the heatmap threshold, minimum lesion volume, lesion rule and density delta
to studies with known lesion percentages (or grades) and write them into a bundle (:mod:`pipelines.calibrate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm.auto import tqdm

from monai_ext.errors import CTSeverityError, InputNotFoundError
from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS
from pipelines.bundle import bundle_path, copy_bundle, load_model
from pipelines.calibrate import fit_calibration, write_calibration
from pipelines.commands.run import TRUST_BUNDLE_HELP
from pipelines.discovery import find_studies
from pipelines.report import read_truth
from pipelines.severity import LESION_RULES
from pipelines.study import PipelineConfig, compute_evidence, resolve_calibration

__all__ = ["register", "run_calibrate"]


def _rules(text: str) -> tuple[str, ...]:
    """``--rules``: comma-separated lesion rules, each one of :data:`pipelines.severity.LESION_RULES`."""
    rules = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = sorted(set(rules) - set(LESION_RULES))
    if unknown or not rules:
        raise argparse.ArgumentTypeError(f"unknown lesion rule(s) {', '.join(unknown) or repr(text)}; "
                                         f"choose from {', '.join(LESION_RULES)}")
    return rules


def run_calibrate(args: argparse.Namespace) -> int:
    from pipelines.predict import format_table

    studies = find_studies(args.studies)
    truth_path = args.truth or (Path(args.studies[0]) / "truth.csv" if Path(args.studies[0]).is_dir() else None)
    if truth_path is None or not Path(truth_path).exists():
        raise InputNotFoundError("no truth CSV (give --truth)", truth_path or args.studies[0])
    truth = read_truth(truth_path)
    missing = [s.study for s in studies if s.study not in truth]
    if missing:
        raise CTSeverityError(f"no truth for {len(missing)} studies, e.g. {', '.join(missing[:3])}", truth_path)
    model = None if args.method == "density" else load_model(args.bundle, device=args.device,
                                                             trust=args.trust_bundle)
    config = PipelineConfig(method=args.method, bundle=args.bundle, lung_mask=args.lung_mask, device=args.device,
                            batch_size=args.batch_size, trust_bundle=args.trust_bundle).validate()
    gate = resolve_calibration(config, model)["slice_gate"]
    evidence = [compute_evidence(s, config, model, gate)
                for s in tqdm(studies, desc=f"evidence ({args.method})", unit="study")]
    fit = fit_calibration(evidence, [truth[s.study] for s in studies], args.method, gate,
                          rules=args.rules or LESION_RULES)
    rows = [[r, v["threshold"] if v["threshold"] is not None else "-", v["min_lesion_ml"],
             v.get("density_delta_hu", "-"), v.get("grow_mm", "-"), v["study_call"], v["mae_percent"],
             v["grade_accuracy"]]
            for r, v in fit.per_rule.items()]
    print(format_table(["lesion_rule", "threshold", "min_lesion_ml", "density_delta_hu", "grow_mm", "study_call",
                        "mae_percent", "grade_accuracy"], rows))
    print()
    print(format_table(["study", "study_probability", "lesion_percent", "grade", "truth_percent", "truth_grade"],
                       [[s.study, d["study_probability"], d["lesion_percent"], d["grade"], d["truth_percent"],
                         d["truth_grade"]] for s, d in zip(studies, fit.per_study)]))
    delta = "" if fit.density_delta_hu is None else f", density delta {fit.density_delta_hu:g} HU"
    if "grow_mm" in fit.values():
        delta += f", growth {fit.grow_mm:g} mm"
    print(f"\nbest: rule {fit.lesion_rule}, threshold {fit.threshold}, min lesion {fit.min_lesion_ml} ml{delta}, "
          f"study call {fit.study_call:g} "
          f"(MAE {fit.mae_percent:.2f} points, grade accuracy {fit.grade_accuracy:.2f}, {fit.n_studies} studies)")
    if args.dry_run:
        return 0
    target = Path(args.out) if args.out else bundle_path(args.bundle)
    if args.out:
        copy_bundle(target, bundle_path(args.bundle), with_models=True)
    path = write_calibration(target, fit, data_note=str(truth_path))
    print(f"calibration written to {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit the lesion threshold and minimum lesion volume to known loads",
                       description="Fit the heatmap threshold, minimum lesion volume and lesion rule that best "
                                   "reproduce known lesion percentages (or grades), and write them into a bundle.")
    p.add_argument("studies", nargs="+", metavar="STUDIES", help="studies (files, folders, manifest)")
    p.add_argument("--truth", help="CSV with study and lesion_percent and/or grade (default: STUDIES/truth.csv)")
    p.add_argument("--method", default="iba", choices=["iba", "hirescam", "gradcam", "igospp", "lrp", "density"])
    p.add_argument("--bundle", help="bundle to calibrate (default: the embedded bundle); see --trust-bundle")
    p.add_argument("--trust-bundle", dest="trust_bundle", action="store_true", help=TRUST_BUNDLE_HELP)
    p.add_argument("--out", help="write a calibrated copy of the bundle here instead of updating it in place")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lung-mask", dest="lung_mask", default="auto", choices=LUNG_BACKENDS)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--rules", type=_rules, default=None, metavar="R1,R2",
                   help=f"lesion rules to try (comma-separated, default all: {','.join(LESION_RULES)}; "
                        "the density method has its own)")
    p.add_argument("--dry-run", action="store_true", help="print the fit without writing it")
    p.set_defaults(func=run_calibrate)
