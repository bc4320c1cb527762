"""Reading a spec's YAML safely (private; :mod:`tunelab.spec` re-exports the limits).

:func:`load_yaml` is PyYAML's safe loader reading YAML 1.2 exponent floats
(``1e6``) as numbers, which refuses what would hang or mislead before any
value is built: more than :data:`MAX_YAML_NODES` values once aliases are
expanded (an alias bomb), nesting deeper than :data:`MAX_YAML_DEPTH`,
recursive aliases and duplicate keys. Its errors are
:class:`~tunelab.errors.SpecError` naming the key path (:func:`join_key`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import SpecError

#: Most YAML values (scalars, lists, mappings) a spec may expand to, aliases expanded.
MAX_YAML_NODES = 50_000
#: Deepest nesting of lists / mappings in a spec.
MAX_YAML_DEPTH = 32


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading YAML 1.2 exponent floats (``1e6``, ``1E-4``) as numbers.

    It stops composing at :data:`MAX_YAML_DEPTH` levels (PyYAML would recurse until
    Python's recursion limit) and at :data:`MAX_YAML_NODES` values.
    """

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        self._nodes += 1
        try:
            problem = None
            if self._depth > MAX_YAML_DEPTH + 1:
                problem = f"nested deeper than {MAX_YAML_DEPTH} levels"
            elif self._nodes > MAX_YAML_NODES:
                problem = f"more than {MAX_YAML_NODES} values (MAX_YAML_NODES)"
            if problem:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(problem=problem, problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str | Path) -> Any:
    """Parse YAML text into Python values, refusing what would hang or mislead.

    The document is composed first and its node graph checked (no recursive
    aliases, at most :data:`MAX_YAML_NODES` values with aliases expanded, at
    most :data:`MAX_YAML_DEPTH` levels, no duplicate keys) before any value
    is built, so an alias bomb costs the size of its text.

    Raises:
        SpecError: invalid YAML, or one of the limits above.
    """
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    except SpecError:
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(source, "", f"invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(
            source, "", f"invalid YAML: nested deeper than {MAX_YAML_DEPTH} levels"
        ) from None
    except ValueError as err:  # a scalar Python cannot hold (an int of 5000 digits)
        problem = str(err).split("; use sys.")[0]
        raise SpecError(source, "", f"invalid YAML value: {problem}") from None
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, source: str | Path) -> None:
    """Check a composed YAML graph (see :func:`load_yaml`); each distinct node is visited once.

    Raises:
        SpecError: a recursive alias, a duplicate key, too deep or too many values.
    """
    sizes: dict[int, int] = {}  # id(node) -> values it expands to (aliases expanded)
    open_nodes: set[int] = set()

    def size(node: yaml.Node, path: str, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise SpecError(source, path, "a recursive alias (an anchor used inside itself)")
        if depth > MAX_YAML_DEPTH:
            raise SpecError(source, path, f"nested deeper than {MAX_YAML_DEPTH} levels")
        open_nodes.add(id(node))
        n = 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                sub = join_key(path, key)
                if key in seen and key != "<<":
                    line = key_node.start_mark.line + 1
                    raise SpecError(
                        source,
                        sub,
                        f"duplicate key (again at line {line}); each key may appear once",
                    )
                seen.add(key)
                n += size(key_node, sub, depth + 1) + size(value_node, sub, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                n += size(item, join_key(path, str(i)), depth + 1)
        if n > MAX_YAML_NODES:
            raise SpecError(
                source,
                path,
                f"expands to more than {MAX_YAML_NODES} values (MAX_YAML_NODES); anchors and "
                f"aliases (&a / *a) repeat what they name, so nested aliases multiply",
            )
        open_nodes.discard(id(node))
        sizes[id(node)] = n
        return n

    size(root, "", 0)


def join_key(prefix: str, key: str) -> str:
    """``cull`` + ``keep`` -> ``cull.keep``; either may be empty (never ``quick.`` or ``.keep``)."""
    return ".".join(p for p in (prefix.strip("."), key.strip(".")) if p)
