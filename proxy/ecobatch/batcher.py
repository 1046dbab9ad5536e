"""The static batcher: batch in, batch out, one batch on the GPU at a time (HF + bitsandbytes, simulated).

Its loop:

1. wait for the first arrival; the window opens at that request's arrival time;
2. ask the policy for a batch size (the energy curve per batch size, under KV headroom and the latency
   SLO) and a window length (``policy.window_length_s``);
3. hold the window until ``policy.should_close`` (target reached, deadline passed, or no further
   arrival expected before the deadline);
4. take up to the batch size from the queue, in order, as long as the group fits the engine
   (``batch_fits``: context length), and run it; the next window's arrivals queue meanwhile.

A batch that times out fails every request in it with 504; a batch cancelled at shutdown fails them
with 503; the engine keeps the GPU until its worker has stopped (see ``hf_bnb``).
"""

from __future__ import annotations

import asyncio

from .admission import Pending
from .backends.base import StaticEngine
from .dispatcher import Dispatcher, as_error
from .domain import GenerationResult
from .errors import BackendFailed, ShuttingDown

__all__ = ["StaticBatcher"]


class StaticBatcher(Dispatcher):
    _engine: StaticEngine

    async def _run(self) -> None:
        admission = self._admission
        while True:
            await admission.wait_for_work()
            decision = admission.decide(inflight=0)
            if not await admission.collect(decision.batch_size, admission.deadline_s(decision)):
                continue
            batch = admission.take(decision.batch_size, fits=self._engine.batch_fits)
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[Pending]) -> None:
        dispatched_s, sequences = self._dispatched(batch)
        started = [self._job(p) for p in batch]
        results: list[GenerationResult | BaseException] = [
            ShuttingDown("ecobatch shut down mid-batch")
        ] * len(batch)
        self._set_inflight(sequences)
        try:
            async with asyncio.timeout(self._timeout_s):
                answered = await self._engine.run_batch([job for _, job in started])
            if len(answered) != len(batch):
                raise BackendFailed(f"the engine returned {len(answered)} results for {len(batch)} requests")
            results = list(answered)
        except TimeoutError:
            results = [self._timeout()] * len(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            results = [as_error(exc)] * len(batch)
        finally:
            self._set_inflight(-sequences)
            for p, (span, _), result in zip(batch, started, results, strict=True):
                self._resolve(p, span, result, dispatched_s, sequences)
