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


def tagged_nodes(scene, attribute: str, references: dict) -> list:
    """The nodes that carry ``attribute`` and whose node references of each role in ``references`` name that ID
    (the results a module made from given inputs)."""
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return [n for n in nodes if n.GetAttribute(attribute)
            and all(n.GetNodeReferenceID(role) == node_id for role, node_id in references.items())]


def remove_with_display(scene, nodes) -> None:
    """Remove nodes from the scene with their display and storage nodes and their subject-hierarchy items (removing
    a node leaves them behind, outside the application at least)."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for node in nodes:
        if node is None or not scene.IsNodePresent(node):
            continue
        item = sh.GetItemByDataNode(node) if sh is not None else 0
        if item:
            sh.RemoveItem(item, False, False)  # the item only; the node goes next
        own = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
            if node.IsA("vtkMRMLDisplayableNode") else []
        own += [node.GetStorageNode()] if node.IsA("vtkMRMLStorableNode") else []
        scene.RemoveNode(node)
        for other in own:
            if other is not None and scene.IsNodePresent(other):
                scene.RemoveNode(other)


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
