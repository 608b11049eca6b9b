"""``ctseverity demo``: synthetic studies with known lesion loads, graded end to end.

Example::

    ctseverity demo --out demo/
    ctseverity demo --out demo/ --studies 8 --method hirescam --workers 2

Writes procedural chest CT phantoms with lesion loads of 0, 12, 38, 62 and 90 % of the lung
volume (one per grade CT-0..CT-4, away from the grade boundaries; more with ``--studies``) and their
``truth.csv`` into ``DIR/studies``, runs the batch on them with the embedded model (as ``ctseverity
run DIR/studies --out DIR --truth DIR/studies/truth.csv``), and prints the table, the agreement with
the truth and where the report is.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

__all__ = ["register", "run", "demo_fractions", "DEMO_SHAPE", "DEMO_SPACING", "DEMO_METHOD"]

#: phantom grid of the demo studies: few slices, to be fast on a laptop CPU
DEMO_SHAPE = (192, 192, 54)
#: voxel size in mm: one of the grids the embedded model was trained on (scripts/train_default_model.py)
DEMO_SPACING = (1.9, 1.9, 5.5)
#: the demo's default method: HiResCAM grades the demo studies in about 10 s each on a laptop CPU,
#: IBA takes about 8 times as long (use ``--method iba`` to see it)
DEMO_METHOD = "hirescam"
_FRACTIONS = (0, 12, 38, 62, 90, 5, 45, 68, 20, 85)


def demo_fractions(n: int) -> list[float]:
    """Lesion percentages of ``n`` demo studies: 0, 12, 38, 62, 90, then 5, 45, 68, 20, 85, repeated.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"--studies must be at least 1, got {n}")
    return [float(_FRACTIONS[i % len(_FRACTIONS)]) for i in range(n)]


def run(args: argparse.Namespace) -> int:
    """Run ``ctseverity demo`` with parsed arguments; returns the exit code."""
    from monai_ext.data.studies import write_studies
    from pipelines.batch import run_batch
    from pipelines.commands.run import config_from_args, print_summary

    fractions = demo_fractions(args.studies)
    config = config_from_args(args)  # bad settings fail before writing anything
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    out = Path(args.out)
    studies = out / "studies"
    print(f"writing {len(fractions)} synthetic studies ({', '.join(f'{f:g}' for f in fractions)} % lesion) "
          f"to {studies}")
    write_studies(studies, fractions, seed=args.seed, shape=DEMO_SHAPE, spacing=DEMO_SPACING,
                  progress=not args.quiet)
    truth = studies / "truth.csv"
    summary = run_batch([studies], out, config, workers=args.workers, truth=truth, progress=not args.quiet)
    print_summary(summary, str(truth))
    return 1 if summary.n_failed else 0


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``sub`` (its ``func`` is :func:`run`)."""
    from pipelines.commands.run import add_run_options

    p = sub.add_parser(
        "demo",
        help="grade a few synthetic studies with known lesion loads and write a report",
        description="Write synthetic chest CT studies with lesion loads of 0, 12, 38, 62 and 90 % of the lung "
                    "(DIR/studies, with truth.csv), grade them with the embedded model, and print the table, the "
                    "agreement with the truth and where report.html is.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--studies", type=int, default=5, metavar="N", help="number of studies (default 5)")
    p.add_argument("--seed", type=int, default=0, help="first phantom seed (default 0)")
    add_run_options(p, method_default=DEMO_METHOD)
    p.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``ctseverity demo ...`` as a function (``argv`` without the subcommand name)."""
    from pipelines.cli import main as cli_main

    return cli_main(["demo", *(argv or [])])
