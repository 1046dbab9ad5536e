"""The offline tools: CLI subcommands that never run inside ``ecobatch serve``.

* ``calibrate``: measure a GPU's energy curve and write it as a profile;
* ``bench``: an open-loop OpenAI load generator, with energy per target;
* ``tune``: what a setting buys for a workload, in a simulation of the engine (``tune.sim``) that runs
  the proxy's own decision code;
* ``plan``: GPUs, kWh, cost and CO2 for a request volume, from a profile.
"""
