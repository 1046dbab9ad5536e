"""ecobatch: an energy-aware adaptive batching proxy for LLM serving.

The folders follow a request: ``serving`` (its way through ``ecobatch serve``: HTTP, the queue, the
batcher or the gate, the replicas), ``engines`` (what runs the model: simulated, hf-bnb, vLLM over HTTP
or in-process), ``energy`` (the meters, the ledger that splits joules among requests, the receipts) and
``tools`` (the offline subcommands: calibrate, bench, tune, plan). The modules at the root are shared by
all of them: the domain values, config, errors, profiles, the clock, the request schema, the command
line. ``testing`` is test and benchmark support, left out of the wheel. The module table:
docs/development.md.
"""

__version__ = "0.1.0"
