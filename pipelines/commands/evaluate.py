"""``ctseverity evaluate``: faithfulness, robustness and localization of attribution methods on a data set.

Example::

    ctseverity evaluate studies/ --methods iba,hirescam,gradcam,igospp,lrp --out eval/
    ctseverity evaluate studies/ --methods hirescam,gradcam --out eval/ --truth studies/truth.csv
    ctseverity evaluate medseg_slices/ --methods hirescam,iba --out eval_2d/ --param iba.steps=5

DATA is a folder of CT studies with optional lesion masks, or of 2D image/mask pairs (see
:mod:`pipelines.eval_slices` for the layouts, and for how 8-bit slices are mapped to the
classifier's input). For every method the maps of the lesion class are computed on the lung
slices (at most ``--max-slices`` per study: lesion slices and some negatives, seeded) and scored
with :mod:`monai_ext.metrics`, restricted to the lung: AOPC (MoRF), insertion and deletion AUC,
Average Drop and Increase, HAAS and Max-Sensitivity, and where lesion masks exist the pointing
game, the energy pointing game, IoU (fixed threshold and best over a sweep) and box accuracy.
I-GOS (``igos``) can be added to the methods to compare it with iGOS++.

Outputs in DIR: ``metrics.csv`` and ``metrics.md`` (method x metric, mean and 95 % bootstrap
interval), ``per_slice.csv`` (raw values), ``curves_insertion.png``, ``curves_deletion.png``,
``curves_morf.png`` (mean curve per method), ``examples/<method>.png`` (a few slices: image, map,
lesion contour) and ``summary.json`` (settings, model, timings). With ``--truth`` and CT studies,
the severity pipeline (:func:`pipelines.batch.run_batch`) also grades every study with each
method into ``DIR/severity/<method>/`` and ``severity.csv`` gives the agreement with the truth
(grade accuracy, lesion-% MAE, Pearson r).

The evaluation itself is :mod:`pipelines.evaluate`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from monai_ext.transforms.lung import BACKENDS as LUNG_BACKENDS
from pipelines.eval_slices import DEFAULT_IMAGE_ROTATION, DEFAULT_IMAGE_WINDOW
from pipelines.evaluate import (
    EVAL_METHODS,
    EvalSettings,
    _metrics,
    build_attributor,
    classifier_summary,
    evaluate_method,
    parse_methods,
    severity_agreement,
    summarize,
    write_outputs,
)
from pipelines.methods import METHODS, parse_params

__all__ = ["register", "run", "main"]


def _window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI in HU, got {text!r}") from None
    return lo, hi


def run(args: argparse.Namespace) -> int:
    """Run ``ctseverity evaluate`` with parsed arguments; returns the exit code."""
    from pipelines.bundle import load_model, predict_slices
    from pipelines.devices import resolve_device
    from pipelines.eval_slices import load_eval_slices

    methods = parse_methods(args.methods)
    params = parse_params(args.param, EVAL_METHODS)
    severity_methods = [m for m in methods if m in METHODS] if args.severity_methods is None else parse_methods(
        args.severity_methods, tuple(METHODS))
    settings = EvalSettings(steps=args.steps, region_size=args.region_size, baseline=args.baseline,
                            target=args.target, batch_size=args.batch_size,
                            sensitivity_slices=args.sensitivity_slices, sensitivity_samples=args.sensitivity_samples,
                            sensitivity_radius=args.sensitivity_radius, iou_threshold=args.iou_threshold,
                            bootstrap=args.bootstrap, seed=args.seed)
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--bootstrap", args.bootstrap, 1),
                             ("--steps", args.steps, 1), ("--examples", args.examples, 0),
                             ("--sensitivity-slices", args.sensitivity_slices, 0)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if args.truth is not None and not Path(args.truth).is_file():
        from monai_ext.errors import InputNotFoundError

        raise InputNotFoundError("truth file not found", args.truth)
    progress = not args.quiet
    device = resolve_device(args.device)
    model = load_model(args.bundle, device=device, trust=args.trust_bundle)
    _metrics(settings, model)  # bad metric settings fail before any work
    for m in methods:  # so do bad method parameters
        build_attributor(m, model, params.get(m))
    data = load_eval_slices(args.data, model, max_slices=args.max_slices or None, max_images=args.max_images or None,
                            seed=args.seed, lung_backend=args.lung_mask, image_window=args.image_window,
                            image_rotation=args.image_rotation, progress=progress)
    if args.truth is not None and data.kind != "studies":
        raise ValueError(f"--truth needs CT studies; {args.data} holds 2D images")
    out = Path(args.out)
    print(f"evaluating {', '.join(methods)} on {len(data)} slices of {len(set(data.source))} "
          f"{'studies' if data.kind == 'studies' else 'images'} ({int(data.localizable.sum())} with lesion)")
    probs = predict_slices(model.network, data.images, device=model.device)
    classifier = classifier_summary(data, probs)
    evals, rows = [], []
    t_start = time.perf_counter()
    for m in methods:
        ev = evaluate_method(m, data, model, settings, params.get(m), progress=progress)
        evals.append(ev)
        rows += summarize(ev, settings, model)
    severity = []
    if args.truth is not None and severity_methods:
        severity = severity_agreement(data.study_paths, args.truth, severity_methods, out, args.bundle, device,
                                      args.lung_mask, params=params, progress=progress,
                                      trust_bundle=args.trust_bundle)
    summary = {
        "data": str(args.data),
        "kind": data.kind,
        "n_slices": len(data),
        "n_sources": len(set(data.source)),
        "n_localizable": int(data.localizable.sum()),
        "n_labelled": int((data.labels >= 0).sum()),
        "model": {"bundle": str(model.bundle), "sha256": model.checksum, "size": model.size,
                  "window": list(model.window), "flatten_beyond_mm": model.flatten_beyond_mm},
        "device": str(device),
        "classifier": classifier,
        "methods": methods,
        "params": params,
        "settings": dict(vars(settings), max_slices=args.max_slices, max_images=args.max_images,
                         image_window=list(args.image_window), image_rotation=args.image_rotation),
        "seconds_per_slice": {ev.method: ev.seconds_per_slice for ev in evals},
        "constant_maps": {ev.method: ev.constant_maps for ev in evals},
        "seconds": time.perf_counter() - t_start,
        "truth": None if args.truth is None else str(args.truth),
        "severity": severity,
        "notes": data.notes + [f"{ev.method}: {ev.constant_maps} of {len(data)} maps are constant inside the lung "
                               "(no evidence found; the metrics see ties, broken in raster order)"
                               for ev in evals if ev.constant_maps],
    }
    written = write_outputs(out, evals, data, probs, rows, summary, severity, n_examples=args.examples)
    table = (out / "metrics.md").read_text(encoding="utf-8")
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"  # the arrows do not exist in an ASCII locale
    print(table.encode(encoding, errors="replace").decode(encoding))
    print(f"outputs: {', '.join(str(out / k) for k in ('metrics.csv', 'metrics.md', 'per_slice.csv') if k in written)}")
    return 0


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to ``sub`` (its ``func`` is :func:`run`)."""
    from pipelines.commands.run import add_bundle_options

    p = sub.add_parser(
        "evaluate",
        help="score attribution methods (faithfulness, robustness, localization) on a data set",
        description="Compute the maps of each method on the lung slices of DATA (CT studies with optional lesion "
                    "masks, or 2D image/mask pairs) and score them: AOPC, insertion/deletion AUC, Average "
                    "Drop/Increase, Max-Sensitivity, HAAS and, with lesion masks, pointing game, energy pointing "
                    "game, IoU and box accuracy. Writes DIR/metrics.csv, metrics.md, per_slice.csv, curve plots "
                    "and example overlays; with --truth also the severity agreement of the study pipeline.",
    )
    p.add_argument("data", metavar="DATA", help="folder of CT studies (or a CSV manifest), or of 2D image/mask pairs")
    p.add_argument("--methods", default=",".join(METHODS), metavar="LIST",
                   help=f"comma-separated methods among {', '.join(EVAL_METHODS)} (default {','.join(METHODS)})")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_bundle_options(p)
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda ... (default auto)")
    p.add_argument("--max-slices", dest="max_slices", type=int, default=12, metavar="N",
                   help="most lung slices per CT study, lesion slices first then negatives, seeded (0: all; "
                        "default 12)")
    p.add_argument("--max-images", dest="max_images", type=int, default=0, metavar="N",
                   help="most 2D images, a seeded sample (0: all; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the slice sample, the metrics and the maps")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--truth", metavar="CSV",
                   help="study, lesion_percent and/or grade: also grade the studies with the pipeline and report "
                        "the agreement (CT studies only)")
    p.add_argument("--severity-methods", dest="severity_methods", metavar="LIST",
                   help="methods graded for --truth (default: the evaluated pipeline methods)")
    p.add_argument("--param", action="append", metavar="METHOD.KEY=VALUE",
                   help="attributor parameter, e.g. iba.steps=5 or igospp.iterations=5 (repeatable)")
    p.add_argument("--target", choices=["lesion", "predicted"], default="lesion",
                   help="class explained and scored: lesion (as the pipeline does) or the predicted class")
    p.add_argument("--steps", type=int, default=50, metavar="N",
                   help="steps of the insertion, deletion and MoRF curves (default 50)")
    p.add_argument("--region-size", dest="region_size", type=int, default=12, metavar="PX",
                   help="side of the AOPC regions in pixels of the classifier input (default 12)")
    p.add_argument("--baseline", choices=["paper", "blur", "uniform", "lung"], default="paper",
                   help="what perturbed pixels become: paper (uniform noise for AOPC, blur for insertion/deletion), "
                        "blur, uniform, or lung (healthy parenchyma, -850 HU)")
    p.add_argument("--sensitivity-slices", dest="sensitivity_slices", type=int, default=8, metavar="N",
                   help="slices (a seeded sample) scored with Max-Sensitivity (default 8; 0 skips it)")
    p.add_argument("--sensitivity-samples", dest="sensitivity_samples", type=int, default=5, metavar="N",
                   help="perturbations per slice for Max-Sensitivity (default 5)")
    p.add_argument("--sensitivity-radius", dest="sensitivity_radius", type=float, default=0.02, metavar="R",
                   help="L-infinity radius of the perturbations, in classifier input units (default 0.02)")
    p.add_argument("--iou-threshold", dest="iou_threshold", type=float, default=0.5, metavar="T",
                   help="threshold on the lung-normalized map for IoU and box accuracy (default 0.5)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, metavar="N",
                   help="slices per attribution and metric batch (default 8)")
    p.add_argument("--examples", type=int, default=4, metavar="N", help="slices in each example figure (default 4)")
    p.add_argument("--lung-mask", dest="lung_mask", default="auto", choices=LUNG_BACKENDS,
                   help="lung mask of studies without a <study>_lung mask file")
    p.add_argument("--image-window", dest="image_window", type=_window,
                   default=DEFAULT_IMAGE_WINDOW, metavar="LO,HI",
                   help=f"HU that gray 0 and 255 of 2D images stand for "
                        f"(default {DEFAULT_IMAGE_WINDOW[0]:g},{DEFAULT_IMAGE_WINDOW[1]:g})")
    p.add_argument("--image-rotation", dest="image_rotation", type=int, default=DEFAULT_IMAGE_ROTATION,
                   metavar="DEG", help="counter-clockwise rotation bringing 2D images to the classifier's layout "
                                       f"(default {DEFAULT_IMAGE_ROTATION}, right for the MedSeg/Inf-Net slices)")
    p.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``ctseverity evaluate ...`` as a function (``argv`` without the subcommand name)."""
    from pipelines.cli import main as cli_main

    return cli_main(["evaluate", *(argv or [])])
