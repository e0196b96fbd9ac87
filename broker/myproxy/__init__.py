"""The MyProxy v2 wire-protocol endpoint (real Debian myproxy clients work unchanged).

``codec`` (pure message format), ``policy_strings`` (myproxy-init -r/-R/-Z
strings <-> owner policy), ``handler`` (one session over the service layer) and
``server`` (TLS loop, process management). See docs/myproxy.md.
"""

from __future__ import annotations

__all__ = ["codec", "handler", "policy_strings", "server"]
