"""Deciding who gets in: token verification and claim policy, no sockets.

:mod:`.tokens` verifies a JWT (PyJWT, explicit algorithm allow-list) into an Identity;
:mod:`.policy` applies the claim rules; :mod:`.jwks` keeps a JWKS key set fresh; and
:mod:`.revocation` reads a revocation list. They take plain values: nothing here knows an
environment variable.
"""
