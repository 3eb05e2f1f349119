"""cch's benchmark suite: ``python -m benchmarks run`` (see docs/benchmarks.md).

Modules: ``runner`` (targets, scenarios, repeats, profile), ``load`` (the load client's turns and
scenarios), ``wsclient`` (a minimal WebSocket client), ``upstream`` (the fake upstream as a
process), ``processes`` (spawning and stopping the upstream and the gateway), ``procstats``
(CPU, RSS, descriptors from /proc), ``profiled_gateway`` (the gateway under cProfile),
``report`` (medians, ratios, targets, plot, docs/benchmarks.md), ``deflate`` (permessage-deflate
on and off, ``python -m benchmarks.deflate``: its own section of docs/benchmarks.md). Not part of
the package cch installs; run it from a checkout.
"""
