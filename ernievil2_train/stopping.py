"""Around every command-line tool's `main`: Ctrl-C and SIGTERM end it with one line, not a traceback, and a
closed output pipe quietly; and DataLoader workers that leave both signals to their parent."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType, TracebackType

INTERRUPTED_EXIT = 128 + signal.SIGINT
TERMINATED_EXIT = 128 + signal.SIGTERM
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE


class Terminated(BaseException):
    """Raised by the SIGTERM handler, so `finally` blocks (temporary files) run as on Ctrl-C."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def run(main: Callable[[], int], prog: str) -> int:
    """`main()`'s exit status; an interruption prints `prog: interrupted` (or `stopped by SIGTERM`) and gives
    the status a shell reports for a process that signal ended (130, 143). A reader of the output that went
    away (`| head`) ends it quietly with 141, as SIGPIPE ends other tools. Child processes still alive on the
    way out (loader workers) are stopped, whichever way it is."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return main()
    except BrokenPipeError:
        # what is still buffered for stdout cannot be written either: send it nowhere, or Python's flush at
        # exit reports the same broken pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_EXIT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Terminated:
        print(f"{prog}: stopped by SIGTERM", file=sys.stderr)
        return TERMINATED_EXIT
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_children()


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: Ctrl-C and SIGTERM are for the main process, which then stops its
    workers itself. A scheduler's SIGTERM reaches the whole process group; a worker it ended would make the
    main process fail (and print torch's "worker killed" traceback) before it saved and stopped. The worker
    then stays quiet about the connection to the main process closing (`quiet_when_the_parent_hangs_up`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = quiet_when_the_parent_hangs_up


def stop_children(timeout: float = 5.0) -> None:
    """Kill the child processes still alive (loader workers ignore SIGTERM, see `ignore_stop_signals`): at
    exit, multiprocessing would send them SIGTERM and then wait for them for ever."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout)


def quiet_when_the_parent_hangs_up(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    """A loader worker's `sys.excepthook`: a lost connection to the main process is not reported. When the
    main process stops (Ctrl-C), the thread that hands it a batch's shared memory can find the connection
    closed, and would print a traceback of that; any other error prints as usual."""
    if isinstance(value, ConnectionError | EOFError):
        return
    sys.__excepthook__(kind, value, tb)
