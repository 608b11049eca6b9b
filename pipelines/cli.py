"""The ``ctseverity`` command line.

One console script with subcommands. Each subcommand lives in its own module of
:mod:`pipelines.commands` (``pipelines/commands/<verb>.py``) that defines ``register(subparsers)``;
the function it sets as ``func`` takes the parsed arguments and returns an exit code. Every
subcommand can be tested by calling :func:`main` with an argument list.

User errors (:class:`~monai_ext.errors.CTSeverityError`, ``FileNotFoundError``, ``ValueError``)
are printed as one line naming the input and the reason, with exit code 2 and no traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from monai_ext.errors import CTSeverityError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1  # something went wrong while working (a failed study, an unexpected error)
EXIT_USAGE = 2  # bad input or arguments

#: modules of ``pipelines.commands`` that each add one subcommand, in the order of ``--help``
COMMAND_MODULES: tuple[str, ...] = (
    "pipelines.commands.synth",
    "pipelines.commands.train",
    "pipelines.commands.predict",
    "pipelines.commands.run",
    "pipelines.commands.demo",
    "pipelines.commands.calibrate",
    "pipelines.commands.inspect",
    "pipelines.commands.evaluate",
)

log = logging.getLogger("ctseverity")


def _version() -> str:
    from pipelines import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="ctseverity",
        description="Weakly supervised lesion quantification and severity grading (CT-0..CT-4) in chest CT.",
    )
    parser.add_argument("--version", action="version", version=f"ctseverity {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record, not the stream it was created with: a
    second ``main()`` in one process (tests, notebooks) may have replaced and closed the first one's stderr."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_ctseverity", False)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._ctseverity = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    # the handler's own level: -q keeps the INFO lines of libraries (an HTTP client, dask) out as well, whatever
    # level another part of the process gave the root logger
    handler.setLevel(level)
    for name in ("ctseverity", "monai_ext", "pipelines"):
        logging.getLogger(name).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0)
    _setup_logging(args.debug, args.quiet)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except (CTSeverityError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        if args.debug:
            raise
        print(f"ctseverity {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        from monai_ext.io import is_disk_full

        if args.debug or not is_disk_full(exc):
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"ctseverity {args.command}: error: {where}no room to write ({exc.strerror or exc}: the disk is full or "
              "a file size limit or quota was reached); the files being written were removed", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"ctseverity {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and not isinstance(exc, CTSeverityError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or 'not found'}"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
