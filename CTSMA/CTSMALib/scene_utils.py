"""Small scene-hygiene helpers: temporary nodes never stay behind, failed loads leave no trace."""

from __future__ import annotations

import contextlib


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _referenced(nodes) -> set[str]:
    kept = set()
    for node in nodes:
        if node is None:
            continue
        kept.add(node.GetID())
        for i in range(node.GetNumberOfNodeReferenceRoles()):
            role = node.GetNthNodeReferenceRole(i)
            for j in range(node.GetNumberOfNodeReferences(role)):
                kept.add(node.GetNthNodeReferenceID(role, j))
    return kept


def _remove(scene, ids) -> None:
    for node_id in ids:
        node = scene.GetNodeByID(node_id)
        if node is not None:
            scene.RemoveNode(node)


@contextlib.contextmanager
def scratch_nodes(scene, keep: list):
    """Remove every node added inside the block (temporary volumes, their display nodes, colour
    tables Slicer makes on export) except those in ``keep`` and the nodes they reference."""
    before = node_ids(scene)
    try:
        yield
    finally:
        _remove(scene, node_ids(scene) - before - _referenced(keep))


@contextlib.contextmanager
def rollback_on_error(scene):
    """If the block raises, remove every node it added (all-or-nothing loading)."""
    before = node_ids(scene)
    try:
        yield
    except BaseException:
        _remove(scene, node_ids(scene) - before)
        raise
