"""Test and benchmark support, not part of the product: real servers as child processes (a vLLM
server, ecobatch proxies: ``servers``), modelled vLLM replicas (``sim_vllm``), random-weight models
built locally (``models``), fault injection (``faults``), named workloads (``workloads``) and a bounded
soak (``soak``).

Importable from a checkout or an editable install (``tests/`` and ``benchmarks/`` use it); the wheel
leaves it out (pyproject's ``packages.find`` excludes it), and nothing ``ecobatch`` runs imports it."""
