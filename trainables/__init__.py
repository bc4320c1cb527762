"""Experiment families: one module each, defining ``FAMILY = tunelab.Family(...)``.

The shipped families are registered as Python entry points in the group
``tunelab.families`` in this repository's ``pyproject.toml``
(``[project.entry-points."tunelab.families"]``), exactly the way a user's own
package registers its families; see :mod:`tunelab.family`. Nothing is imported
here, so listing families never imports a family module.
"""
