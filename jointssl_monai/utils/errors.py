"""One line for a failed run: the user's mistake (a file, a datalist, a config value) without a traceback.

Our checks raise ``ValueError`` and ``TypeError`` subclasses (``BadInputError``, the argument checks of every
constructor), ``OSError`` subclasses (missing or unwritable paths, the disk preflight), ``FloatingPointError``
(a non-finite loss) and ``ImportError`` (an optional dependency not installed); their messages name the file
or key, the problem and the fix.
MONAI wraps them (``RuntimeError("Failed to instantiate ...")``) and a DataLoader worker sends them back as
text (``"Caught BadInputError in DataLoader worker process 0 ..."``); :func:`error_summary` digs the
original message out of both.

:func:`install_error_summary` makes a process end with that message: ``pretrain.json`` calls it first thing,
so ``python -m monai.bundle run`` keeps MONAI's own output and adds the message as its last line. The
``jointssl`` commands start bundle runs with ``JOINTSSL_BRIEF_ERRORS=1``: the run then prints no traceback
(neither the interpreter's nor a handler's logged one) and leaves the summary, as JSON in
``JOINTSSL_ERROR_FILE``, for the command to report. ``JOINTSSL_DEBUG=1`` (or ``jointssl --debug``) shows
every traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from types import TracebackType

__all__ = [
    "BRIEF_ENV",
    "DEBUG_ENV",
    "ERROR_FILE_ENV",
    "USER_ERROR_TYPES",
    "env_flag",
    "error_summary",
    "install_error_summary",
    "user_error_message",
]

DEBUG_ENV = "JOINTSSL_DEBUG"
BRIEF_ENV = "JOINTSSL_BRIEF_ERRORS"
ERROR_FILE_ENV = "JOINTSSL_ERROR_FILE"

#: Exception types that report a problem with the user's input rather than a bug (exit status 2).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OSError,
    FloatingPointError,
    ImportError,
)

_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+")
_TRACEBACK = "Traceback (most recent call last)"


def _is_user_type_name(name: str) -> bool:
    pending = list(USER_ERROR_TYPES)
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return True
        pending += cls.__subclasses__()
    return False


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and all(err is not s for s in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def user_error_message(err: BaseException) -> str | None:
    """The message of the outermost user error in ``err``'s cause chain (``None``: none is there).

    The outermost, because our checks re-raise a library's error with the file name added
    (``raise BadInputError(path, ...) from err``); MONAI's ``RuntimeError`` wrappers are passed over.
    """
    for item in _chain(err):
        text = str(item)
        worker = _WORKER_ERROR.search(text)
        if worker and _is_user_type_name(worker.group(1)):
            # The worker's traceback as text; its last line is "module.Type: message".
            last = [line for line in text.strip().splitlines() if line.strip()][-1]
            return re.sub(r"^[\w.]+: ", "", last, count=1)
        if isinstance(item, USER_ERROR_TYPES) and not worker:
            return text
    return None


def error_summary(err: BaseException) -> tuple[int, str]:
    """``(exit status, one message)``: 2 and the user error's message, or 1 and the unexpected error."""
    message = user_error_message(err)
    if message is not None:
        return 2, f"error: {message}"
    root = _chain(err)[-1]
    return 1, (
        f"internal error: {type(root).__name__}: {root} (rerun with --debug, or {DEBUG_ENV}=1, for the "
        "traceback; please report it)"
    )


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other than empty, 0, false or no."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


class _BriefRecords:
    """A log record factory that drops tracebacks from log records (``logger.exception`` of handlers, a
    DataLoader worker's traceback inside a message), for runs that must end with one line."""

    def __init__(self, factory) -> None:
        self.factory = factory

    def __call__(self, name, level, fn, lno, msg, args, exc_info, func=None, sinfo=None, **kwargs):
        if isinstance(msg, str) and _TRACEBACK in msg:
            msg = msg.split("\n", 1)[0]
        return self.factory(name, level, fn, lno, msg, args, None, func, sinfo, **kwargs)


def _write_error_file(code: int, message: str) -> bool:
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    try:
        with open(path, "w") as f:
            json.dump({"exit_code": code, "message": message}, f)
    except OSError:
        return False
    return True


def install_error_summary() -> None:
    """End this process's uncaught errors with their one-line summary (see the module docstring).

    Idempotent. Returns ``None`` so that a bundle config can call it.
    """
    if getattr(sys.excepthook, "_jointssl_summary", False):
        return
    previous = sys.excepthook
    brief = env_flag(BRIEF_ENV) and not env_flag(DEBUG_ENV)
    if brief and not isinstance(logging.getLogRecordFactory(), _BriefRecords):
        logging.setLogRecordFactory(_BriefRecords(logging.getLogRecordFactory()))

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: as Python does
            previous(kind, err, tb)
            return
        code, message = error_summary(err)
        written = _write_error_file(code, message)
        if brief and written:  # the jointssl command that started this run prints it, with its exit status
            return
        if not brief:
            previous(kind, err, tb)
        print(f"jointssl: {message}", file=sys.stderr, flush=True)

    hook._jointssl_summary = True  # type: ignore[attr-defined]
    sys.excepthook = hook
