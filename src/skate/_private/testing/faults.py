"""Test-only fault injection in the transport (placeholder until the property tests land).

``install_from_env()`` reads ``SKATE_FAULTS`` (JSON) and sets
``protocol.transport.fault_hook``.
"""

from __future__ import annotations


def install_from_env() -> None:
    return None
