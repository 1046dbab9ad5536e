"""Servers started by the tests stop with everything they started, even where a test killed the server
itself (the fault tests SIGKILL vLLM's API server, whose engine-core process would outlive it)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from ecobatch.testing.servers import Proc, left_running


def test_a_killed_server_s_child_is_stopped_with_its_group(tmp_path: Path) -> None:
    started = tmp_path / "child-started"
    script = "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); "
    script += f"open({str(started)!r}, 'w').close(); time.sleep(300)"
    proc = Proc("parent", [sys.executable, "-c", script], dict(os.environ), tmp_path, port=0)
    deadline = time.monotonic() + 30
    while not started.exists():  # the child is running once the parent wrote the file
        assert time.monotonic() < deadline, proc.tail()
        time.sleep(0.01)
    proc.signal(signal.SIGKILL)
    proc.proc.wait()
    assert proc.group_alive(), "the child outlives its killed parent (what left vLLM engines running)"
    assert proc in left_running()
    proc.stop()
    assert not proc.group_alive()
    assert proc not in left_running()


def test_a_stopped_servers_group_number_is_never_signalled_again(tmp_path: Path) -> None:
    """Once its group is gone the number may go to another session: a second stop, or the suite's
    check at the end, must not touch it."""
    proc = Proc(
        "short", [sys.executable, "-c", "import time; time.sleep(300)"], dict(os.environ), tmp_path, 0
    )
    proc.stop()
    assert not proc.group_alive() and proc not in left_running()
    other = Proc(
        "other", [sys.executable, "-c", "import time; time.sleep(300)"], dict(os.environ), tmp_path, 0
    )
    try:
        proc.proc.pid = other.proc.pid  # as if the number had been reused by another session's leader
        proc.stop()  # does nothing
        assert other.proc.poll() is None, "a stopped server's stop signalled another process group"
        assert proc not in left_running()
    finally:
        other.stop()
