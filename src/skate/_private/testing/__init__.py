"""Test-only support: fault injection for the property tests. Never imported unless
SKATE_FAULTS is set."""
