"""Planning a run before it loads anything: `tuner plan` (see plan.py for the phases,
trace.py for how activations are measured, storage.py for the bytes table)."""

from tuner.planning.plan import Plan, make_plan

__all__ = ["Plan", "make_plan"]
