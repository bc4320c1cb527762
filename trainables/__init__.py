"""Experiment families: one module each, registered here by name.

Each module defines ``FAMILY = tunelab.Family(...)``; modules are imported
lazily so that listing families costs nothing.
"""

FAMILIES: dict[str, str] = {
    "ouroboros": "trainables.ouroboros",
    "flow_policy": "trainables.flow_policy",
    "recursive_reasoner": "trainables.recursive_reasoner",
}

__all__ = ["FAMILIES"]
