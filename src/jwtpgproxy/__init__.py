"""jwt-postgresql-proxy: a stateless PostgreSQL proxy that authenticates clients by JWT."""

__version__ = "0.1.0"
