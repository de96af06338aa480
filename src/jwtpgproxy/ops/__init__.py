"""Running it: settings, the daemon, workers, the admin endpoints and the command line.

:mod:`.config` is the only place that knows environment variables; it turns them into the
runtime the proxy layer runs with. :mod:`.daemon` assembles and runs it, :mod:`.workers`
supervises several processes on one port, :mod:`.admin` serves /metrics, /healthz and
/readyz, and :mod:`.cli` is the ``jwt-postgresql-proxy`` command.
"""
