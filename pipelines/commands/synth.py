"""``ctseverity synth``: write synthetic or semi-synthetic studies with ground truth.

Example::

    ctseverity synth --out synth_data --fractions 0,5,20,40,60,80 --seed 1 --masks
    ctseverity synth --out semi --fractions 10,30 --base chest_ct.nii.gz

Each study is a NIfTI file (int16 HU, with its affine) named ``synth_<i>_f<percent>.nii.gz``;
``truth.csv`` gives ``study, lesion_percent, grade`` (the lesion share reached, in percent of the
lung volume, and its CT-0..CT-4 grade). ``--masks`` adds ``<study>_lesion.nii.gz`` and
``<study>_lung.nii.gz``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

__all__ = ["register", "run", "parse_percents", "parse_triple"]

# its log lines keep the name they had before the commands moved into pipelines.commands
log = logging.getLogger("pipelines.synth")

DEFAULT_FRACTIONS = "0,5,20,40,60,80"
DEFAULT_SHAPE = (256, 256, 96)
DEFAULT_SPACING = (1.5, 1.5, 3.0)


def parse_percents(text: str) -> list[float]:
    """Parse ``"0,5,20"`` into percentages, each in 0..100.

    Raises:
        ValueError: an item is not a number or is outside 0..100, naming ``--fractions``.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"--fractions: expected comma-separated percentages (0..100), got {text!r}")
    values = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"--fractions: {t!r} is not a number (percent of lung volume, 0..100)") from None
        if not (0.0 <= v <= 100.0):
            raise ValueError(f"--fractions: {t} is outside 0..100 (percent of lung volume)")
        values.append(v)
    return values


def parse_triple(text: str, option: str, integer: bool) -> tuple:
    """Parse ``"X,Y,Z"`` into three positive numbers (integers for ``integer``).

    Raises:
        ValueError: not three positive numbers, naming ``option``.
    """
    what = "integers" if integer else "numbers"
    parts = [t.strip() for t in str(text).replace("x", ",").split(",")]
    try:
        values = tuple(int(t) if integer else float(t) for t in parts)
    except ValueError:
        raise ValueError(f"{option}: expected three positive {what} X,Y,Z, got {text!r}") from None
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"{option}: expected three positive {what} X,Y,Z, got {text!r}")
    return values


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``synth`` subcommand to ``subparsers`` (its ``func`` is :func:`run`)."""
    p = subparsers.add_parser(
        "synth",
        help="write synthetic chest CT studies with lesions and truth.csv",
        description=(
            "Write one NIfTI study per lesion percentage (procedural chest CT phantoms, or a given CT "
            "with inserted COVID-19-like lesions) and truth.csv (study, lesion_percent, grade)."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--fractions",
        default=DEFAULT_FRACTIONS,
        metavar="P1,P2,...",
        help=f"lesion shares of the lung volume in percent, 0..100 (default {DEFAULT_FRACTIONS})",
    )
    p.add_argument("--base", metavar="CT_FILE", help="insert lesions into this CT instead of phantoms")
    p.add_argument("--seed", type=int, default=0, help="first seed; study i uses seed + i (default 0)")
    p.add_argument("--shape", metavar="X,Y,Z", help="phantom grid (default 256,256,96)")
    p.add_argument("--spacing", metavar="SX,SY,SZ", help="phantom voxel size in mm (default 1.5,1.5,3.0)")
    p.add_argument("--kind", choices=("mixed", "ggo", "consolidation"), default="mixed", help="lesion kind")
    p.add_argument("--masks", action="store_true", help="also write <study>_lesion and <study>_lung masks")
    p.add_argument(
        "--lung-backend",
        choices=("threshold", "lungmask", "auto"),
        default="threshold",
        help="lung mask of --base (default threshold)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``ctseverity synth`` with parsed arguments; returns the exit code."""
    from monai_ext.data.studies import write_studies

    percents = parse_percents(args.fractions)
    if args.base is not None and (args.shape is not None or args.spacing is not None):
        raise ValueError("--shape/--spacing set the phantom grid; they cannot be combined with --base")
    shape = parse_triple(args.shape, "--shape", integer=True) if args.shape else DEFAULT_SHAPE
    spacing = parse_triple(args.spacing, "--spacing", integer=False) if args.spacing else DEFAULT_SPACING
    if args.shape and min(shape) < 8:
        raise ValueError(f"--shape: every size must be at least 8 voxels, got {args.shape!r}")
    records = write_studies(
        args.out,
        percents,
        base=args.base,
        seed=args.seed,
        shape=shape,
        spacing=spacing,
        kind=args.kind,
        masks=args.masks,
        lung_backend=args.lung_backend,
        progress=not getattr(args, "quiet", False),
    )
    log.info("wrote %d studies and truth.csv to %s", len(records), args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``ctseverity synth ...`` as a function (``argv`` without the subcommand name)."""
    from pipelines.cli import main as cli_main

    return cli_main(["synth", *(argv or [])])
