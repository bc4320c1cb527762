"""Read cluster.yaml, optionally replacing values of its site block.

cluster.yaml keeps every site-specific value in one block at the top,
`metadata.site`, as YAML anchors that the rest of the file refers to with
aliases (`partition: *partition_a100x4`). Replacing an anchored value before
the aliases are resolved changes it everywhere it is used, so a variant of the
file (the CI cluster of the tests, or another site) needs only new site values,
never a second hand-written copy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml


def load_cluster_config(
    path: str | os.PathLike[str], *, site: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load a cluster.yaml, with `site` values replacing those of `metadata.site`.

    Args:
        path: The cluster.yaml.
        site: New values for keys of the `metadata.site` block; each must already
            exist there (a typo is a ValueError naming the key and the known keys).

    Returns:
        The config as `ray up` would read it, aliases resolved.

    Example:
        >>> cfg = load_cluster_config("cluster.yaml", site={"partition_a100x1": "debug"})
        >>> cfg["available_node_types"]["a100x1"]["node_config"]["partition"]  # doctest: +SKIP
        'debug'
    """
    with open(path) as f:
        loader = yaml.SafeLoader(f.read())
    try:
        root = loader.get_single_node()
        if root is None:
            raise ValueError(f"{path} is empty; it must hold a cluster config mapping.")
        if site:
            block = _site_block(root, str(path))
            for key, value in site.items():
                _overwrite(_value_node(block, key, str(path)), value)
        config = loader.construct_document(root)
    finally:
        loader.dispose()
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a cluster config must be a YAML mapping.")
    return config


def dump_cluster_config(config: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a loaded (possibly modified) config for `ray up`, aliases expanded."""

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    with open(path, "w") as f:
        yaml.dump(dict(config), f, Dumper=_NoAliases, sort_keys=False)


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


def _mapping_get(node: yaml.Node, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return v
    return None


def _site_block(root: yaml.Node, path: str) -> yaml.MappingNode:
    block = _mapping_get(_mapping_get(root, "metadata") or root, "site")
    if not isinstance(block, yaml.MappingNode):
        raise ValueError(f"{path}: no `metadata.site` block to override; add one at the top.")
    return block


def _value_node(block: yaml.MappingNode, key: str, path: str) -> yaml.Node:
    node = _mapping_get(block, key)
    if node is None:
        known = ", ".join(k.value for k, _ in block.value)
        raise ValueError(f"{path}: metadata.site.{key} does not exist; known keys: {known}.")
    return node


def _overwrite(node: yaml.Node, value: Any) -> None:
    """Turn `node` into `value` in place, so every alias of it sees the new value."""
    new = yaml.compose(yaml.safe_dump(value))
    assert new is not None  # safe_dump always writes one document
    node.__class__ = new.__class__
    node.tag = new.tag
    node.value = new.value
    for attr in ("style", "flow_style"):
        setattr(node, attr, getattr(new, attr, None))
