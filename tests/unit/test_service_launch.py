"""Starting a service process and reading back the port it bound (dsi/cluster.py), with stand-in
child scripts instead of real services: a late line, a line written in pieces, an early exit, silence."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from dsi.cluster import ClusterError, launch, launch_and_wait, serve_command, stop_process

pytestmark = pytest.mark.unit


def child(code: str) -> list[str]:
    return [sys.executable, "-c", "import sys, time\n" + code]


def test_the_port_is_read_from_a_line_printed_late(tmp_path: Path) -> None:
    script = (
        "print('loading the model...', flush=True)\n"
        "print('some log line on stderr', file=sys.stderr, flush=True)\n"
        "time.sleep(1.0)\n"
        "print('dsi-target listening on 0.0.0.0:43219', flush=True)\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    sp = launch_and_wait("late", child(script), tmp_path / "late.log", timeout_s=30, host="127.0.0.1")
    try:
        assert time.monotonic() - t0 >= 1.0  # it waited for the line, not for the process to start
        assert sp.address == "127.0.0.1:43219"  # the port from the line, the host the caller connects to
        assert sp.process.poll() is None
        assert "loading the model" in sp.log_tail()  # the log is kept whole
    finally:
        stop_process(sp.process, grace_s=5)


def test_a_line_written_in_pieces_is_read_once_complete(tmp_path: Path) -> None:
    script = (
        "sys.stdout.write('dsi-drafter listen'); sys.stdout.flush()\n"
        "time.sleep(0.5)\n"
        "sys.stdout.write('ing on [::1]:5123\\n'); sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    sp = launch("pieces", child(script), tmp_path / "pieces.log")
    try:
        assert sp.wait_listening(time.monotonic() + 30) == "127.0.0.1:5123"
    finally:
        stop_process(sp.process, grace_s=5)


def test_a_child_that_exits_first_is_an_error_with_its_log(tmp_path: Path) -> None:
    script = "print('ModelLoadError: no such checkpoint /x', file=sys.stderr, flush=True)\nsys.exit(3)\n"
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        launch_and_wait("broken", child(script), tmp_path / "broken.log", timeout_s=60)
    assert time.monotonic() - t0 < 30  # noticed at once, not at the deadline
    message = str(err.value)
    assert "broken exited with code 3" in message
    assert "ModelLoadError: no such checkpoint /x" in message
    assert str(tmp_path / "broken.log") in message


def test_a_silent_child_times_out_and_is_stopped(tmp_path: Path) -> None:
    script = "print('still loading', flush=True)\ntime.sleep(60)\n"
    sp = launch("silent", child(script), tmp_path / "silent.log")
    with pytest.raises(ClusterError) as err:
        sp.wait_listening(time.monotonic() + 1.0)
    assert "did not report 'listening on' in time" in str(err.value)
    assert "still loading" in str(err.value)
    stop_process(sp.process, grace_s=5)
    assert sp.process.poll() is not None
    # launch_and_wait stops the child itself when it does not come up.
    with pytest.raises(ClusterError):
        launch_and_wait("silent2", child(script), tmp_path / "silent2.log", timeout_s=1.0)


def test_services_are_started_on_port_zero() -> None:
    cmd = serve_command("target", ["--model", "m"], host="127.0.0.1")
    assert cmd[cmd.index("--port") + 1] == "0"
    assert serve_command("orchestrator", [], port=50051)[-1] == "50051"
