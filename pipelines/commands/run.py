"""``ctseverity run``: severity grades, heatmaps and lesion masks for a batch of chest CT studies.

Example::

    ctseverity run studies/ --out results/
    ctseverity run studies/ manifest.csv --out results/ --method hirescam --workers 4 --truth truth.csv
    ctseverity run studies/ --out results/ --scheduler tcp://10.0.0.5:8786

Per study ``DIR/<study>/`` holds heatmap, lesion and lung masks on the input grid, ``overview.png``,
for DICOM inputs a DICOM SEG and SR (``dicom/``) and ``result.json``; ``DIR/results.csv`` and
``DIR/report.html`` cover the batch. Running again into the same DIR skips the studies that are
complete. Exit code 0 when every study was graded, 1 when any failed, 2 for bad arguments or input.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS
from pipelines.devices import resolve_device
from pipelines.methods import METHODS
from pipelines.severity import LESION_RULES

if TYPE_CHECKING:
    from pipelines.batch import BatchSummary
    from pipelines.study import PipelineConfig

__all__ = ["register", "run", "add_run_options", "add_bundle_options", "TRUST_BUNDLE_HELP", "config_from_args",
           "print_summary"]

METHOD_CHOICES = (*METHODS, "density")


def add_run_options(p: argparse.ArgumentParser, method_default: str = "iba") -> None:
    """The options shared by ``run`` and ``demo``: method, bundle, device, workers."""
    p.add_argument("--method", default=method_default, choices=METHOD_CHOICES,
                   help=f"attribution method, or density (abnormal attenuation, no classifier) "
                        f"(default {method_default})")
    add_bundle_options(p)
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes (default 1: in this process; N > 1: a local dask cluster, "
                        "or one worker per GPU with a cuda device)")


#: what ``--trust-bundle`` says in every command's help
TRUST_BUNDLE_HELP = ("run the bundle's model.json network definition as MONAI config code. Without it a bundle other "
                     "than the embedded one is only read for its weights (weights_only, checksum checked) and a "
                     "plain MONAI network (DenseNet, ResNet, SENet, UNet ...): a bundle from elsewhere could "
                     "otherwise run any code (_target_, $ expressions). Give it only for bundles you trust")


def add_bundle_options(p: argparse.ArgumentParser) -> None:
    """``--bundle`` and ``--trust-bundle`` (``run``, ``demo``, ``predict``, ``evaluate``)."""
    p.add_argument("--bundle", metavar="PATH",
                   help="bundle folder (default: the embedded bundle); see --trust-bundle")
    p.add_argument("--trust-bundle", dest="trust_bundle", action="store_true", help=TRUST_BUNDLE_HELP)


def _method_params(method: str, items: list[str] | None) -> dict:
    """The attributor parameters of ``--param METHOD.KEY=VALUE`` items for the run's method.

    Raises:
        ValueError: a malformed item, parameters for another method, or a parameter the method
            does not take.
    """
    if not items:
        return {}
    from pipelines.methods import check_params, parse_params

    parsed = parse_params(items, METHOD_CHOICES)
    other = sorted(set(parsed) - {method})
    if other:
        raise ValueError(f"--param for {', '.join(other)}, but --method is {method}")
    if method == "density":
        raise ValueError("--param: the density method has no attributor parameters")
    check_params(method, parsed[method])
    return parsed[method]


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """A :class:`~pipelines.study.PipelineConfig` from parsed arguments (validated).

    Raises:
        ValueError: a bad setting (method, threshold, minimum lesion volume, batch size).
    """
    from pipelines.study import PipelineConfig

    params = _method_params(args.method, getattr(args, "param", None))
    return PipelineConfig(
        method=args.method,
        method_params=params,
        bundle=args.bundle,
        lung_mask=getattr(args, "lung_mask", "auto"),
        lung_weights=getattr(args, "lung_weights", None),
        device=resolve_device(args.device),
        lesion_rule=getattr(args, "lesion_rule", None),
        threshold=getattr(args, "threshold", None),
        min_lesion_ml=getattr(args, "min_lesion_ml", None),
        density_delta_hu=getattr(args, "density_delta_hu", None),
        study_call=getattr(args, "study_call", None),
        grow_mm=getattr(args, "grow_mm", None),
        dicom_out=getattr(args, "dicom_out", None),
        batch_size=getattr(args, "batch_size", None) or 16,
        max_memory=_max_memory(args),
        keep_identifiers=bool(getattr(args, "keep_identifiers", False)),
        trust_bundle=bool(getattr(args, "trust_bundle", False)),
        series_uid=getattr(args, "series_uid", None),
    ).validate()


def _max_memory(args: argparse.Namespace) -> int:
    """``--max-memory`` in bytes; by default three quarters of this machine's memory shared by the workers."""
    from monai_ext.io.checks import default_max_memory, parse_memory

    if getattr(args, "max_memory", None):
        return parse_memory(args.max_memory)
    return default_max_memory() // max(1, getattr(args, "workers", 1) or 1)


def _cell(v: object, digits: int = 1) -> object:
    if v in (None, ""):
        return "-"
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return v
    return f"{f:.{digits}f}" if math.isfinite(f) else "-"


def print_summary(summary: BatchSummary, truth_path: str | None = None) -> None:
    """Print the results table, the counts, the agreement with truth and where the outputs are."""
    from pipelines.predict import format_table

    rows = []
    for r in summary.rows:
        ok = r["status"] == "ok"
        rows.append([r["study"], r["status"], r["grade"] if ok else "-", _cell(r["lesion_percent"]),
                     _cell(r["lung_volume_ml"], 0), _cell(r["lesion_volume_ml"]), _cell(r["n_lesions"], 0),
                     r["method"], _cell(r["seconds"]), r["error"] or ""])
    print(format_table(["study", "status", "grade", "lesion_%", "lung_ml", "lesion_ml", "lesions", "method",
                        "seconds", "error"], rows))
    for r in summary.rows:
        for w in filter(None, str(r.get("warnings") or "").split("; ")):  # results.csv joins them with "; "
            print(f"warning: {r['study']}: {w}")
    print()
    parts = [f"{summary.n_ok} processed", f"{summary.n_failed} failed"]
    if summary.n_skipped:
        parts.append(f"{summary.n_skipped} already complete (skipped)")
    print(f"{summary.n_ok + summary.n_failed + summary.n_skipped} studies: {', '.join(parts)} "
          f"in {summary.seconds:.0f} s")
    if truth_path is not None:
        from pipelines.report import agreement, read_truth

        truth = read_truth(truth_path)
        pairs = [(float(r["lesion_percent"]), str(r["grade"]), truth[r["study"]]["lesion_percent"],
                  truth[r["study"]]["grade"]) for r in summary.rows if r["status"] == "ok" and r["study"] in truth]
        if pairs:
            a = agreement(pairs)
            right = sum(a["confusion"][i][i] for i in range(5))
            line = f"agreement with {truth_path}: grade right in {right} of {a['n_grade']}"
            if a["n_grade"]:
                line += f" ({100 * a['grade_accuracy']:.0f} %), within one grade {100 * a['within_one']:.0f} %"
            if a["n_percent"]:
                line += f", lesion-% MAE {a['mae']:.1f} pp"
                if not math.isnan(a["pearson_r"]):
                    line += f", Pearson r {a['pearson_r']:.3f}"
            print(line)
        else:
            print(f"agreement with {truth_path}: no graded study is listed there")
    print(f"results: {summary.results_csv}")
    if summary.report is not None:
        print(f"report:  {summary.report}")


def run(args: argparse.Namespace) -> int:
    """Run ``ctseverity run`` with parsed arguments; returns the exit code."""
    from pipelines.batch import run_batch

    config = config_from_args(args)
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if config.method != "density":  # an untrusted bundle's refusal in one line, not once per study
        from pipelines.bundle import check_bundle

        check_bundle(config.bundle, config.trust_bundle)
    urls = [i for i in args.inputs if str(i).lower().startswith(("dicomweb+http://", "dicomweb+https://"))]
    if urls or args.study or args.study_date or args.store:
        if len(urls) != 1:
            raise ValueError("--study, --study-date and --store need one DICOMweb input (dicomweb+http://host/path)"
                             if not urls else "one DICOMweb server per run")
        from pipelines.dicom.pacs import run_pacs

        return run_pacs(args, config, [i for i in args.inputs if i not in urls], urls[0])
    summary = run_batch(args.inputs, args.out, config, workers=args.workers, scheduler=args.scheduler,
                        truth=args.truth, progress=not args.quiet, study_timeout=args.study_timeout,
                        pipeline=args.pipeline)
    print_summary(summary, args.truth)
    return 1 if summary.n_failed else 0


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``run`` subcommand to ``sub`` (its ``func`` is :func:`run`)."""
    p = sub.add_parser(
        "run",
        help="grade a batch of chest CT studies (heatmaps, lesion masks, results.csv, report.html)",
        description="Lung mask, attribution heatmaps, lesion mask, lesion % of lung volume and grade CT-0..CT-4 "
                    "for every study; writes DIR/<study>/, DIR/results.csv and DIR/report.html. Studies already "
                    "complete in DIR (same settings) are skipped. Exit code 1 if any study failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="study file, DICOM series folder, folder of studies (recursive), CSV manifest, or a DICOMweb "
                        "server: dicomweb+http(s)://host:port/path with --study or --study-date (docs/pacs.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_run_options(p)
    p.add_argument("--lung-mask", dest="lung_mask", default="auto", choices=LUNG_BACKENDS,
                   help="lung mask: auto = the lungmask R231 U-Net when its weights are on disk, else the bundle's "
                        "own lung U-Net (unet), else the HU threshold")
    p.add_argument("--lung-weights", dest="lung_weights", metavar="PATH", help="lungmask U-Net weights file")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on an existing dask scheduler (tcp://host:8786)")
    p.add_argument("--pipeline", choices=("per-study", "staged"), default="per-study",
                   help="per-study: one task per study, reading to writing; staged: CPU tasks (read, lung mask, "
                        "slices; outputs) and device tasks (classifier, attribution) on the slices of several "
                        "studies, on workers with a GPU resource where the cluster has them, a bounded number of "
                        "studies in flight; the same outputs (default per-study; docs/scaling.md)")
    p.add_argument("--truth", metavar="CSV",
                   help="known lesion_percent and/or grade per study, for the report's agreement figures")
    p.add_argument("--lesion-rule", dest="lesion_rule", choices=LESION_RULES,
                   help="heatmap region alone, or intersected with abnormal attenuation: absolute (heatmap-density), "
                        "absolute above the study's own dependent density (heatmap-dependent) or relative to the "
                        "study's normal lung (heatmap-relative) (default: the bundle's)")
    p.add_argument("--threshold", type=float, metavar="T", help="heatmap threshold in [0, 1] (default: the bundle's)")
    p.add_argument("--min-lesion-ml", dest="min_lesion_ml", type=float, metavar="V",
                   help="smallest lesion component kept, in ml (default: the bundle's)")
    p.add_argument("--density-delta", dest="density_delta_hu", type=float, metavar="HU",
                   help="rise above the study's normal lung level counted as abnormal, for heatmap-relative and "
                        "--method density (default: the bundle's)")
    p.add_argument("--grow-mm", dest="grow_mm", type=float, metavar="MM",
                   help="density rules: grow each lesion from the thresholded heatmap through the abnormal "
                        "attenuation it lies in by up to MM (0: the intersection only; default: the bundle's)")
    p.add_argument("--study-call", dest="study_call", type=float, metavar="P",
                   help="study probability below which a study has no lesion (CT-0), in [0, 1]; 0 = off "
                        "(default: the bundle's)")
    p.add_argument("--param", action="append", default=None, metavar="METHOD.KEY=VALUE",
                   help="attributor parameter for --method (repeatable; JSON values), e.g. "
                        "iba.autocast_dtype=bfloat16 or igospp.iterations=5")
    p.add_argument("--dicom-out", dest="dicom_out", action=argparse.BooleanOptionalAction, default=None,
                   help="write DIR/<study>/dicom/: a DICOM Segmentation (lung, lesions) and a measurement report SR; "
                        "by default for DICOM series inputs only; for other inputs a CT series with generated UIDs "
                        "is written beside them (--no-dicom-out: never)")
    p.add_argument("--series", dest="series_uid", metavar="UID",
                   help="the DICOM series (Series Instance UID) to grade in a folder holding several; by default the "
                        "axial CT series fit for the lungs: thin slices, lung kernel, most slices (the choice is "
                        "logged and kept as a warning); localizers, dose reports and SR files are left out")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16, metavar="N",
                   help="slices per attribution batch (default 16)")
    p.add_argument("--max-memory", dest="max_memory", metavar="SIZE",
                   help="memory budget per study, e.g. 8G: an input whose header declares a larger volume is "
                        "refused before it is read (default: 3/4 of this machine's memory divided by --workers)")
    p.add_argument("--study-timeout", dest="study_timeout", type=float, metavar="SECONDS",
                   help="time limit per study: a study past it is recorded as failed and the batch goes on "
                        "(the input is read in a child process stopped at the limit; later stages are checked "
                        "between stages and attribution batches; default: none)")
    p.add_argument("--keep-identifiers", dest="keep_identifiers", action="store_true",
                   help="put the patient name, ID and birth date of DICOM inputs into result.json and results.csv "
                        "(and a PACS run's log); by default only the DICOM outputs hold them")
    pacs = p.add_argument_group(
        "PACS (a DICOMweb input)",
        "Studies are pulled from the server (the thin-slice axial CT series of each; the rule is logged) into "
        "DIR/pacs/<StudyInstanceUID>/ and graded as DIR/<StudyInstanceUID>/. Credentials come from "
        "CTSEVERITY_DICOMWEB_USER and CTSEVERITY_DICOMWEB_PASSWORD (or CTSEVERITY_DICOMWEB_TOKEN) or a netrc entry "
        "of the host, never from the command line. Example: ctseverity run dicomweb+http://localhost:8042/dicom-web "
        "--study 1.2.840.113619.2.55.3 --out results --store")
    pacs.add_argument("--study", action="append", default=None, metavar="UID",
                      help="Study Instance UID to grade (repeatable)")
    pacs.add_argument("--study-date", dest="study_date", metavar="RANGE",
                      help="grade the studies a QIDO-RS query finds: study date YYYYMMDD, YYYYMMDD-YYYYMMDD, "
                           "YYYYMMDD- or -YYYYMMDD")
    pacs.add_argument("--modality", default="CT", metavar="M",
                      help="with --study-date: a modality the studies hold (default CT)")
    pacs.add_argument("--store", action="store_true",
                      help="send each graded study's DICOM SEG, SR and overview capture back into it (STOW-RS)")
    p.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``ctseverity run ...`` as a function (``argv`` without the subcommand name)."""
    from pipelines.cli import main as cli_main

    return cli_main(["run", *(argv or [])])
