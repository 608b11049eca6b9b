"""The ``ctseverity`` command line: one module per verb (``synth``, ``train``, ``predict``, ``run``, ``demo``,
``calibrate``, ``inspect``, ``evaluate``).

Each module defines ``register(subparsers)``, which adds its subcommand and sets as ``func`` the function
that takes the parsed arguments and returns the exit code; :mod:`pipelines.cli` registers them in the order
of its ``COMMAND_MODULES``. The modules hold only argument parsing and what the commands print: the work
is done by the pipeline core in :mod:`pipelines` (:mod:`pipelines.batch`, :mod:`pipelines.train`,
:mod:`pipelines.calibrate`, :mod:`pipelines.evaluate`, ...). Nothing is imported here, so that loading one
command does not load the others.
"""

from __future__ import annotations

__all__: list[str] = []
