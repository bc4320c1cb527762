"""`{{name}}` placeholders in the shipped sbatch templates (shell `$` stays untouched)."""

from __future__ import annotations

import re
from importlib import resources

_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


def render_template(name: str, values: dict[str, str]) -> str:
    """Fill template `name` (a file next to this module) with `values`.

    Every placeholder must get a value and every value must be used: a typo in
    either the template or the caller is an error, not a silently empty line.
    """
    text = resources.files("tunelab.slurm").joinpath(name).read_text()
    wanted = set(_PLACEHOLDER.findall(text))
    missing, unused = wanted - set(values), set(values) - wanted
    if missing or unused:
        raise ValueError(
            f"template {name}: missing values {sorted(missing)}, unused values {sorted(unused)}"
        )
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
