"""Several replicas behind one load balancer: what they share through Redis (docs/scaling.md).

``redis.py`` holds the one connection to Redis (a service: lazy, reconnecting, closed on stop)
and runs Lua scripts; ``limits.py`` keeps per-key limits in Redis with the same answers as
:class:`cch.keylimits.MemoryLimitStore`; ``fallback.py`` answers without Redis while it is
down (a per-replica share of each limit, or a refusal) and switches back by itself;
``service.py`` puts the three together for the gateway's service tree.

Nothing here is imported unless ``[cluster] redis`` is set, and ``txredisapi`` (the
``cluster`` extra) only once a connection is started.
"""
