"""The embedded clusters the property tests run on: one at a time, reused while the
configuration stays the same, checked for leaks each time one stops.

A configuration is ``skate.init`` keyword arguments plus an optional fault plan. The plan
travels in ``SKATE_FAULTS``, set only while ``skate.init()`` spawns the node process (which
the zygote and every worker inherit from), and is armed in this driver process with the
role "driver". Kill points report to the session's one ``KillInjector``.

Starting a cluster costs ~0.15 s, so tests share them: a module keeps its cluster until it
asks for another configuration or ends; a program that left the cluster in doubt (a wrong
result, a hang, a leak, a known bug met) gets a fresh one.
"""

from __future__ import annotations

import os

import skate
from skate._private import runtime
from skate._private.testing import faults

from kill_injector import KillInjector


class PropertyClusters:
    def __init__(self, tracker, temp_dir: str):
        self.tracker = tracker
        self.temp_dir = temp_dir
        self.key = None
        self._plan = None
        self._init_kwargs: dict = {}
        self._injector: KillInjector | None = None

    @property
    def injector(self) -> KillInjector:
        if self._injector is None:
            self._injector = KillInjector(os.path.join(self.temp_dir, f"inj-{os.getpid()}.sock"))
        return self._injector

    def ensure(self, plan: faults.FaultPlan | None = None, **init_kwargs) -> None:
        """A cluster with this configuration is up (started if it was not)."""
        key = (tuple(sorted(init_kwargs.items())), plan.to_json() if plan is not None else None)
        if skate.is_initialized() and key == self.key:
            return
        problems = self.stop()
        if problems:
            raise AssertionError("\n".join(problems))
        if plan is not None:
            os.environ[faults.ENV_VAR] = plan.to_json()
        faults.install(plan, role="driver")
        try:
            skate.init(**init_kwargs)
        finally:
            os.environ.pop(faults.ENV_VAR, None)  # for this cluster's processes only
        self.key = key
        self._plan = plan
        self._init_kwargs = dict(init_kwargs)
        self.tracker.note_session(runtime.info().get("session"))

    def restart(self) -> list[str]:
        """A fresh cluster with the same configuration; returns the leaks of the old one."""
        plan, kwargs = self._plan, self._init_kwargs
        problems = self.stop()
        self.ensure(plan, **kwargs)
        return problems

    def stop(self) -> list[str]:
        """Shuts the cluster down; returns what it left behind (processes, segments)."""
        faults.install(None)
        was_up = skate.is_initialized() or self.key is not None
        if skate.is_initialized():
            skate.shutdown()
        self.key = None
        if not was_up:
            return []
        try:
            self.tracker.assert_clean("after skate.shutdown() of a property-test cluster")
        except AssertionError as exc:
            return [str(exc)]
        return []

    def close(self) -> list[str]:
        problems = self.stop()
        if self._injector is not None:
            self._injector.close()
            self._injector = None
        return problems
