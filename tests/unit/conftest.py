"""Unit tests share the few helpers they need (self-signed certificates, the local HTTP
server) with the other suites: they live in tests/integration/harness.py, imported from
there rather than copied."""

from __future__ import annotations

import sys
from pathlib import Path

_INTEGRATION = str(Path(__file__).resolve().parents[1] / "integration")
if _INTEGRATION not in sys.path:
    sys.path.insert(0, _INTEGRATION)
