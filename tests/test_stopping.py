"""How the tools stop: Ctrl-C and SIGTERM end `main` with one line and the shell's status for the signal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ernievil2_train.stopping import (
    BROKEN_PIPE_EXIT,
    INTERRUPTED_EXIT,
    TERMINATED_EXIT,
    ignore_stop_signals,
    quiet_when_the_parent_hangs_up,
    run,
)


def test_ctrl_c_ends_main_with_one_line_and_status_130(capsys: pytest.CaptureFixture[str]) -> None:
    def main() -> int:
        raise KeyboardInterrupt

    assert run(main, "tool") == INTERRUPTED_EXIT == 130
    assert capsys.readouterr().err == "tool: interrupted\n"


def test_sigterm_ends_main_with_one_line_and_status_143(capsys: pytest.CaptureFixture[str]) -> None:
    cleaned = []

    def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            return 0
        finally:
            cleaned.append(True)  # `finally` blocks run, as on Ctrl-C

    before = signal.getsignal(signal.SIGTERM)
    assert run(main, "tool") == TERMINATED_EXIT == 143
    assert capsys.readouterr().err == "tool: stopped by SIGTERM\n" and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_a_finished_main_keeps_its_status() -> None:
    assert run(lambda: 3, "tool") == 3


def test_loader_workers_ignore_both_stop_signals() -> None:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.excepthook
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in previous)
        assert sys.excepthook is quiet_when_the_parent_hangs_up
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.excepthook = hook


def test_a_worker_is_quiet_about_its_parent_hanging_up_only(capsys: pytest.CaptureFixture[str]) -> None:
    """The main process stopping closes the connection a worker hands batches over: no traceback of that.
    Any other uncaught error in a worker still prints."""
    for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), EOFError()):
        quiet_when_the_parent_hangs_up(type(error), error, None)
    assert capsys.readouterr().err == ""
    quiet_when_the_parent_hangs_up(ValueError, ValueError("a real bug"), None)
    assert "ValueError: a real bug" in capsys.readouterr().err


EXIT_WITH_A_WORKER = """
import multiprocessing, sys, time
from ernievil2_train.stopping import ignore_stop_signals, run, stop_children

def work():
    ignore_stop_signals(0)
    time.sleep(60)

def main():
    worker = multiprocessing.get_context("fork").Process(target=work, daemon=True)
    worker.start()
    time.sleep(0.5)
    return 143

if __name__ == "__main__":
    if sys.argv[1] == "tool":  # a command-line tool: `run` around its main
        sys.exit(run(main, "tool"))
    status = main()
    if sys.argv[1] == "stop":
        stop_children()
    sys.exit(status)
"""


@pytest.mark.parametrize("way_out", ["stop", "tool", "keep"])
def test_exiting_with_a_worker_that_ignores_sigterm_does_not_hang(way_out: str) -> None:
    """At exit, multiprocessing sends its daemon children SIGTERM and waits for them: a loader worker ignores
    SIGTERM, so the main process waited for ever after a SIGTERM stop. Killing the children first ends it, and
    every command-line tool's `run` does so on its way out (the control without it still hangs)."""
    proc = subprocess.Popen([sys.executable, "-c", EXIT_WITH_A_WORKER, way_out], start_new_session=True)
    try:
        if way_out != "keep":
            assert proc.wait(timeout=30) == 143
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the control's process and its worker
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_reader_that_went_away_ends_a_tool_quietly_with_141(paddle_ref: Path) -> None:
    """`tool | head`: once the reader is gone, writing raises BrokenPipeError; the tool ends with the status
    SIGPIPE gives other tools, and no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        embeddings = paddle_ref / "eval_n50_d16.txt"
        cmd = [sys.executable, "-m", "ernievil2_train.evaluate", str(embeddings), "--json"]
        run_ = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (run_.returncode, run_.stderr) == (BROKEN_PIPE_EXIT, "") and BROKEN_PIPE_EXIT == 141
