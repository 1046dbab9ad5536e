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
