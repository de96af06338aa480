"""The asyncio layer: sockets, transports and one task per client.

:mod:`.listener` accepts clients and shuts down in order; :mod:`.session` is one client's life
(handshake, verification, upstream login, splice); :mod:`.upstream` connects and logs in to
PostgreSQL; :mod:`.splice` copies bytes both ways with backpressure; :mod:`.cancel` maps cancel
keys; :mod:`.connection` is the handshake-phase transport adapter; :mod:`.runtime` holds the
immutable values they run with; :mod:`.metrics` the counters they keep.
"""
