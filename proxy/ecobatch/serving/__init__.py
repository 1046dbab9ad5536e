"""The request path of ``ecobatch serve``, in the order a request meets it.

``server`` (the process: listen, bring the engine up, drain on SIGTERM) → ``app`` (the HTTP routes;
``auth`` checks the key, ``openai_api`` parses the body and renders the answer) → the ``dispatcher``
that ``runtime`` holds (``runtime``: the moving parts and their life), which queues the request in
``admission`` (bounded, one line per tier; ``arrivals``: its rate estimates) until its shape's loop
takes it:

* static engines: ``batcher``, with ``policy``'s batch size and window;
* continuous engines: ``gate``, with ``release``'s plan (``load``: the live estimates it reads) and
  ``routing``'s choice among the replicas of ``pool`` (``membership`` and ``replica_sources``:
  replicas that come and go);

then the engine (``ecobatch.engines``); a streamed request's outputs wait in ``stream`` for its handler.
``metrics`` exports all of it. ``policy``, ``release``, ``routing``, ``load`` and ``arrivals`` are pure
decisions on injected times; ``ecobatch tune`` and ``plan`` run them too.
"""
