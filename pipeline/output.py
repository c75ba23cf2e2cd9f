"""What a run prints, and where everything else it causes to be printed goes.

A command that builds, deploys or measures runs inside :func:`captured`. For its duration file
descriptors 1 and 2 point at the run's log file (``build/<spec>/<target>/log.txt``), so whatever
the converters print lands there and not on the console: LiteRT-Torch progress trees, TensorFlow
and absl C++ logging, oneDNN, torchao, pnnx, tqdm, onnxruntime, including C++ code that writes to
the descriptor directly, which no ``sys.stdout`` swap would catch. Python warnings and every
logger are routed into the same file. The level environment variables of those libraries
(TF_CPP_MIN_LOG_LEVEL, GLOG_minloglevel) are left alone on purpose: they would drop lines from
the log, and the log is where a failed conversion is diagnosed; the capture alone keeps them off
the console.

edgeship's own lines (:func:`say`, and records of the ``pipeline`` and ``calibration`` loggers)
go to the log and to the console, which writes to copies of the original descriptors: every line
with ``NORMAL``, errors only with ``QUIET``; with ``VERBOSE`` the console shows the log file as it
grows (ours and theirs, in order). Long steps (:func:`step`) get a live display when the console
is a terminal, and on a pipe a start line once a step has run a few seconds, then one a minute.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

QUIET, NORMAL, VERBOSE = 0, 1, 2
OUR_LOGGERS = ("pipeline", "calibration")  # everything else is third-party: the log file only
ANNOUNCE_AFTER_S = 3.0  # on a pipe, a step still running after this long says it started ...
HEARTBEAT_S = 60.0  # ... and then that it is still running, once a minute


@dataclass
class _Step:
    """A running step: its title, its task in the live display, whether it has said anything yet."""

    title: str
    task: Any = None
    spoken: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Session:
    """The run being captured: its log file, the console it may write to, the live display."""

    verbosity: int
    log_fd: int
    console: Any  # rich Console on the original stderr
    live: Any = None  # rich Progress, on a terminal with NORMAL verbosity
    lock: threading.Lock = field(default_factory=threading.Lock)
    steps: threading.local = field(default_factory=threading.local)  # .current: this thread's _Step

    def write_log(self, text: str) -> None:
        data = (text.rstrip("\n") + "\n").encode("utf-8", errors="replace")
        with self.lock, contextlib.suppress(OSError):  # a full disk fails the stage that fills it, not a log line
            os.write(self.log_fd, data)

    def show(self, text: str, style: str | None = "dim") -> None:
        """One of our lines on the console (VERBOSE: the log tail shows it already)."""
        if self.verbosity == NORMAL:
            from rich.text import Text

            # styled Text, not print(style=): under a live display that style would dim the display too
            line = Text(text, style=style or "") if self.console.is_terminal else Text(text)
            with self.lock:
                self.console.print(line, highlight=False, soft_wrap=True)


_ACTIVE: list[_Session] = []


def _session() -> _Session | None:
    return _ACTIVE[-1] if _ACTIVE else None


def say(message: str, level: int = logging.INFO) -> None:
    """One of edgeship's progress lines: into the run's log, and onto the console as verbosity says."""
    s = _session()
    if s is None:  # no run captured (library use, commands that build nothing): plain stderr
        print(message, file=sys.stderr, flush=True)
        return
    s.write_log(message)
    if level >= logging.ERROR or s.verbosity == NORMAL:
        s.show(message, style="red" if level >= logging.ERROR else "dim")


class _Handler(logging.Handler):
    """Every record into the log file; ours also onto the console (sub-steps of the current step)."""

    def __init__(self, session: _Session) -> None:
        super().__init__(logging.INFO)
        self.session = session
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            ours = record.name.split(".")[0] in OUR_LOGGERS
            if not ours:
                self.session.write_log(self.format(record))
                return
            text = record.getMessage()
            current: _Step | None = getattr(self.session.steps, "current", None)
            if current:
                text = f"{current.title}: {text}"
                current.spoken.set()  # its sub-steps show it is running: no "title ..." line needed
            progress = getattr(record, "progress", None)
            if self.session.live is not None and current and progress:
                # on a terminal a counted sub-step moves the step's bar instead of adding a line
                self.session.live.update(current.task, description=text, completed=progress[0], total=progress[1])
                self.session.write_log(text)
                return
            say(f"  {text}", record.levelno)
        except Exception:  # a log line must never break the run
            self.handleError(record)


@contextlib.contextmanager
def step(title: str, announce_after_s: float = ANNOUNCE_AFTER_S) -> Iterator[None]:
    """A long step: a spinner with its elapsed time on a terminal; on a pipe ``title ...`` once it
    has run ``announce_after_s`` (0: at once), then a line a minute while it runs."""
    s = _session()
    if s is None or s.verbosity == QUIET:
        yield
        return
    outer, current = getattr(s.steps, "current", None), _Step(title)
    s.steps.current = current
    if s.live is not None:
        current.task = s.live.add_task(title, total=None)
        try:
            yield
        finally:
            s.live.remove_task(current.task)
            s.steps.current = outer
        return
    done = threading.Event()
    thread = threading.Thread(target=_announce, args=(current, announce_after_s, done), daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        s.steps.current = outer


def _announce(current: _Step, first_s: float, done: threading.Event) -> None:
    t0 = time.monotonic()
    if done.wait(first_s):
        return
    if not current.spoken.is_set():
        say(f"{current.title} ...")
    while not done.wait(HEARTBEAT_S):
        say(f"{current.title} ... still running ({(time.monotonic() - t0) / 60:.0f} min)")


def _real_stream(fd: int) -> IO[str]:
    """A text stream on a copy of ``fd``: where the console goes while ``fd`` points at the log."""
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


def _live(console: Any) -> Any:
    """The terminal's progress display: spinner, step (and sub-step), bar, elapsed time."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # redirect_*=False: rich would otherwise swap sys.stdout/sys.stderr back onto the terminal,
    # and everything the converters print from Python would reach the console again
    return Progress(SpinnerColumn(), TextColumn("{task.description}", style="bold", markup=False), BarColumn(bar_width=20),
                    TimeElapsedColumn(), console=console, transient=True, redirect_stdout=False,
                    redirect_stderr=False)


def _tail(path: Path, offset: int, out_fd: int, stop: threading.Event) -> None:
    """VERBOSE: copy what the log file gains onto the console until ``stop``, then the rest."""
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            stopping = stop.is_set()
            data = f.read(65536)
            if data:
                os.write(out_fd, data)
            elif stopping:
                return
            else:
                stop.wait(0.1)


@contextlib.contextmanager
def _logging_into(session: _Session) -> Iterator[None]:
    """Every logger and every Python warning into the session (restored afterwards)."""
    root = logging.getLogger()
    ours = [logging.getLogger(name) for name in OUR_LOGGERS]
    handler, levels = _Handler(session), [lg.level for lg in (root, *ours)]
    root.addHandler(handler)
    # our loggers at INFO of their own: code that mutes the root logger around a noisy library
    # call (onnxruntime.quantization's advice) must not mute our sub-steps with it
    for lg in (root, *ours):
        lg.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for lg, level in zip((root, *ours), levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _descriptors_into(log_fd: int) -> Iterator[tuple[IO[str], IO[str]]]:
    """Point fds 1 and 2 at ``log_fd``; yields text streams on the original stdout and stderr."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    real_out, real_err = _real_stream(1), _real_stream(2)
    saved = os.dup(1), os.dup(2)
    reconfigure = getattr(sys.stdout, "reconfigure", None)  # absent when stdout is not a text file
    line_buffered = getattr(sys.stdout, "line_buffering", False)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # the log is a file: without this Python's prints would reach it long after the C++ lines
        if reconfigure:
            reconfigure(line_buffering=True)
        yield real_out, real_err
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if reconfigure:
            reconfigure(line_buffering=line_buffered)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        real_out.close()
        real_err.close()


@contextlib.contextmanager
def captured(log_file: Path, verbosity: int, err_console: Any, out_console: Any, header: str = "") -> Iterator[None]:
    """Run the block with third-party output in ``log_file`` (truncated) and the consoles on the
    terminal (see the module docstring). ``err_console``/``out_console``: rich Consoles for
    messages and results; they write to the original stderr and stdout while the block runs."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        with _descriptors_into(log_fd) as (real_out, real_err):
            err_console.file, out_console.file = real_err, real_out
            session = _Session(verbosity, log_fd, err_console)
            try:
                with _running(session, log_file, header):
                    yield
            finally:
                err_console.file = out_console.file = None  # back to sys.stderr / sys.stdout
    finally:
        os.close(log_fd)


@contextlib.contextmanager
def _running(session: _Session, log_file: Path, header: str) -> Iterator[None]:
    """The session active: header, logging routed, live display or log tail; the error that ends
    the run written into the log (the console gets its one line from the CLI)."""
    if header:
        session.write_log(header)
    stop, tail = threading.Event(), None
    if session.verbosity == VERBOSE:
        tail = threading.Thread(target=_tail, args=(log_file, 0, session.console.file.fileno(), stop), daemon=True)
        tail.start()
    elif session.verbosity == NORMAL and session.console.is_terminal:
        session.live = _live(session.console)
        session.live.start()
    _ACTIVE.append(session)
    try:
        with _logging_into(session):
            yield
    except BaseException as exc:
        session.write_log(_ending(exc))
        raise
    finally:
        _ACTIVE.remove(session)
        if session.live is not None:
            session.live.stop()
        if tail is not None:
            stop.set()
            tail.join()


def _ending(exc: BaseException) -> str:
    """How the run ended, for the log: the one line of our errors, a traceback of anything else."""
    from pipeline.errors import EdgeshipError

    if isinstance(exc, KeyboardInterrupt):
        return "edgeship: interrupted"
    if isinstance(exc, EdgeshipError):
        return f"edgeship: exit {exc.exit_code}: {exc}"
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
