"""Fixtures for the adversarial suite.

The integration harness (ProxyProcess, RawClient, ...) lives in tests/integration/harness.py;
it is imported from there rather than copied, so both suites run the daemon the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

_INTEGRATION = str(Path(__file__).resolve().parents[1] / "integration")
if _INTEGRATION not in sys.path:
    sys.path.insert(0, _INTEGRATION)
