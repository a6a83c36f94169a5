"""Static checks that a module's Python code and its Qt Designer ``.ui`` file agree.

Qt cannot run here (nor in CI), so these checks read both files as text:

1. every ``self.ui.<name>`` the module code uses is declared in the module's ``UI_WIDGETS``
   mapping (``name -> Qt class``) and exists in the ``.ui`` file with exactly that class;
2. every widget carrying a ``SlicerParameterName`` property names a field of the module's
   ``@parameterNodeWrapper`` class, and its class can represent that field's type the way
   Slicer's GUI connectors require (``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py``:
   e.g. a QComboBox bound to ``str`` needs a ``Choice`` annotation, a path needs a
   ``ctkPathLineEdit`` or ``ctkDirectoryButton``, a node a ``qMRMLNodeComboBox``).

Run as ``python -m CTSMALib.ui_check MODULE.py UI_FILE`` or call :func:`check_module`; it
returns a list of problems (empty when all is well).
"""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

PARAMETER_PROPERTY = "SlicerParameterName"

# Which widget classes Slicer's GUI connectors bind to which parameter types (type(widget) is
# compared exactly there, so subclasses do not count).
_CONNECTORS = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSlider", "QSpinBox", "QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
            "ctkDoubleSpinBox", "qMRMLSpinBox", "QComboBox", "ctkComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
              "qMRMLSpinBox", "QComboBox", "ctkComboBox"},
    "str": {"QComboBox", "ctkComboBox", "QLineEdit", "QLabel", "QTextEdit"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}
_COMBOS = {"QComboBox", "ctkComboBox"}


def ui_widgets(ui_path: str | Path) -> dict[str, str]:
    """``{widget name: class}`` of every widget in a ``.ui`` file."""
    root = ET.parse(ui_path).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def ui_parameter_bindings(ui_path: str | Path) -> dict[str, tuple[str, str]]:
    """``{widget name: (class, parameter name)}`` for widgets with a ``SlicerParameterName``."""
    root = ET.parse(ui_path).getroot()
    out = {}
    for w in root.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == PARAMETER_PROPERTY:
                s = p.find("string")
                out[w.get("name")] = (w.get("class"), (s.text or "").strip() if s is not None else "")
    return out


def used_ui_names(py_source: str) -> dict[str, int]:
    """``{name: first line}`` of every ``self.ui.<name>`` in the module code."""
    used: dict[str, int] = {}
    for node in ast.walk(ast.parse(py_source)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.setdefault(node.attr, node.lineno)
    return used


def declared_ui_widgets(py_source: str) -> dict[str, str]:
    """The module's ``UI_WIDGETS = {...}`` literal (widget name -> expected class)."""
    for node in ast.walk(ast.parse(py_source)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "UI_WIDGETS" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    return {}


def _kind(annotation: ast.expr) -> tuple[str, bool]:
    """(connector kind, has a Choice annotation) of a parameter's type annotation."""
    has_choice = False
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        elts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        has_choice = any(isinstance(e, ast.Call) and getattr(e.func, "id", "") == "Choice" for e in elts[1:])
        annotation = elts[0]
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") in ("Optional", "Union"):
        annotation = annotation.slice.elts[0] if isinstance(annotation.slice, ast.Tuple) else annotation.slice
    if isinstance(annotation, ast.BinOp):  # X | None
        annotation = annotation.left
    name = annotation.attr if isinstance(annotation, ast.Attribute) else getattr(annotation, "id", "")
    if name.startswith("vtkMRML"):
        return "node", has_choice
    if name in ("Path", "PurePath", "PosixPath", "WindowsPath"):
        return "Path", has_choice
    return name, has_choice


def parameter_fields(py_source: str) -> dict[str, tuple[str, bool]]:
    """Fields of the ``@parameterNodeWrapper`` classes: ``{name: (kind, has Choice)}``."""
    fields = {}
    for node in ast.walk(ast.parse(py_source)):
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", getattr(d, "attr", "")) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    fields[stmt.target.id] = _kind(stmt.annotation)
    return fields


def check_module(py_path: str | Path, ui_path: str | Path) -> list[str]:
    """All disagreements between a module file and its ``.ui`` file (empty list: consistent)."""
    source = Path(py_path).read_text(encoding="utf-8")
    widgets = ui_widgets(ui_path)
    declared = declared_ui_widgets(source)
    problems = []
    if not declared:
        problems.append(f"{Path(py_path).name}: no UI_WIDGETS mapping (widget name -> class) found")
    for name, line in sorted(used_ui_names(source).items()):
        if name not in declared:
            problems.append(f"line {line}: self.ui.{name} is used but not declared in UI_WIDGETS")
    for name, cls in sorted(declared.items()):
        if name not in widgets:
            problems.append(f"widget '{name}' ({cls}) is missing from {Path(ui_path).name}")
        elif widgets[name] != cls:
            problems.append(f"widget '{name}' is a {widgets[name]} in {Path(ui_path).name}, the code expects {cls}")
    fields = parameter_fields(source)
    for name, (cls, parameter) in sorted(ui_parameter_bindings(ui_path).items()):
        if parameter not in fields:
            problems.append(f"widget '{name}' is bound to parameter '{parameter}', which the parameter node lacks")
            continue
        kind, has_choice = fields[parameter]
        if cls not in _CONNECTORS.get(kind, set()):
            problems.append(f"widget '{name}' ({cls}) cannot represent parameter '{parameter}' of type {kind}")
        elif cls in _COMBOS and not has_choice:
            problems.append(f"combo box '{name}' is bound to '{parameter}', which needs a Choice annotation")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m CTSMALib.ui_check MODULE.py UI_FILE.ui", file=sys.stderr)
        return 2
    problems = check_module(*argv)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
