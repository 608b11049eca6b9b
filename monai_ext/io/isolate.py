"""Running a call that may hang (a decoder, a read that never returns) in a child process that can be stopped.

A Python thread blocked in a C library (SimpleITK, GDCM, pydicom's decoders, ``open()`` on a named pipe) cannot
be interrupted. :func:`call_in_child` forks the process, runs the call in the child and waits for its answer
for at most a given time; past it, the child is killed (SIGKILL) and :class:`TimeoutError` is raised. The
child is a fork, so nothing is imported again and the call starts at once; it should not use torch or OpenMP
(a fork of a process whose OpenMP threads ran may hang in them): the readers use SimpleITK, pydicom, nibabel
and numpy only. Its answer (result or exception) comes back pickled through a pipe, with the log records it
emitted, which are handled again in the parent (so that they reach the parent's handlers and levels).

``os.fork`` is used directly rather than :mod:`multiprocessing`, whose processes cannot start children from a
daemonic process (a dask worker). Where there is no ``fork`` (Windows) the call runs in the calling process,
without a time limit.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["call_in_child", "can_isolate"]

T = TypeVar("T")


def can_isolate() -> bool:
    """Whether calls can run in a child process here (POSIX ``fork``)."""
    return hasattr(os, "fork")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        self.records.append(record)


def _child(func: Callable[..., Any], args: tuple, kwargs: dict, fd: int) -> None:
    """In the child: run the call, send ``(kind, value, records)`` and leave without cleanup."""
    collect = _Collect()
    for logger in [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                          if isinstance(v, logging.Logger))]:
        logger.handlers = []
    logging.getLogger().addHandler(collect)
    try:
        payload: tuple = ("ok", func(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        payload = ("error", exc)
    try:
        data = pickle.dumps((*payload, collect.records), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - an unpicklable answer still says what happened
        data = pickle.dumps(("error", RuntimeError(f"{type(payload[1]).__name__}: {str(payload[1])[:300]} "
                                                   f"(not picklable: {exc})"), []))
    with os.fdopen(fd, "wb") as fh:
        fh.write(len(data).to_bytes(8, "little") + data)


def call_in_child(func: Callable[..., T], seconds: float, *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in a forked child, stopped after ``seconds``.

    Args:
        func: the call (its result and exceptions must pickle).
        seconds: time limit for the call and the transfer of its result.

    Returns:
        The call's result.

    Raises:
        TimeoutError: the call did not answer in time (the child was killed).
        ChildProcessError: the child ended without an answer (killed by a signal, a crash in a C library).
        Exception: what the call raised.
    """
    if not can_isolate():
        return func(*args, **kwargs)
    deadline = time.monotonic() + max(float(seconds), 0.0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 0
        try:
            os.close(r)
            _child(func, args, kwargs, w)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = bytearray()
    size, status = None, None
    try:
        while size is None or len(data) < size + 8:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(pid)
                raise TimeoutError(f"no answer within {seconds:g} s; stopped")
            if not select.select([r], [], [], min(left, 0.5))[0]:
                done, status = os.waitpid(pid, os.WNOHANG)  # ended without writing (a crash)?
                if done:
                    while select.select([r], [], [], 0)[0] and (chunk := os.read(r, 1 << 20)):
                        data += chunk  # what it wrote just before it ended
                    break
                continue
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            data += chunk
            if size is None and len(data) >= 8:
                size = int.from_bytes(data[:8], "little")
    finally:
        os.close(r)
    if status is None:
        _, status = os.waitpid(pid, 0)
    if size is None or len(data) < size + 8:
        how = (f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
               else f"exit code {os.WEXITSTATUS(status)}")
        raise ChildProcessError(f"the child process ended without an answer ({how})")
    kind, value, records = pickle.loads(memoryview(data)[8:])
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
    if kind == "error":
        raise value
    return value


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
