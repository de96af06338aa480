"""The PostgreSQL wire protocol, sans-IO: bytes in, events and bytes out.

No sockets, no asyncio, no settings -- so every parser here is unit-tested and fuzzed byte by
byte. :mod:`.wire` frames and codes messages (every length checked against a cap before
anything is buffered), :mod:`.frontend` is the client handshake state machine, :mod:`.login`
the upstream login state machine, and :mod:`.scram` the SCRAM-SHA-256(-PLUS) client.
"""
