"""The Mailchimp stand-in's ``fields`` / ``exclude_fields`` query parameters: dotted paths
(``members.id``) parsed into a tree, and a response projected onto it."""

from __future__ import annotations

from typing import Any


def field_tree(spec: str | None) -> dict | None:
    """``"members.id,total_items"`` -> ``{"members": {"id": {}}, "total_items": {}}``.

    An empty dict means "the whole value"; a shorter path wins over a longer one under it.
    """
    if not spec:
        return None
    paths = sorted((p.strip() for p in spec.split(",") if p.strip()), key=lambda p: p.count("."))
    tree: dict = {}
    for path in paths:
        node: dict | None = tree
        parts = path.split(".")
        for part in parts[:-1]:
            if part in node and node[part] is None:
                node = None  # already whole
                break
            node = node.setdefault(part, {})
        if node is not None:
            node[parts[-1]] = None

    def finish(t: dict) -> dict:
        return {k: ({} if v is None else finish(v)) for k, v in t.items()}

    return finish(tree)


def _include(value: Any, tree: dict) -> Any:
    if not tree:
        return value
    if isinstance(value, list):
        return [_include(v, tree) for v in value]
    if isinstance(value, dict):
        return {k: _include(value[k], sub) for k, sub in tree.items() if k in value}
    return value


def _exclude(value: Any, tree: dict) -> Any:
    if isinstance(value, list):
        return [_exclude(v, tree) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            sub = tree.get(k)
            if sub is None:
                out[k] = v
            elif sub:
                out[k] = _exclude(v, sub)
        return out
    return value


def project(value: Any, fields: dict | None, exclude: dict | None) -> Any:
    if fields:
        value = _include(value, fields)
    if exclude:
        value = _exclude(value, exclude)
    return value
