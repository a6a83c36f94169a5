"""Table (rows of dicts or a pandas DataFrame) <-> MRML table node, with units.

Numbers become ``vtkDoubleArray`` columns (NaN stays NaN; integers stay integers via
``vtkLongLongArray``), booleans ``vtkBitArray``, everything else ``vtkStringArray``. Units and
descriptions are stored as Slicer column properties (``unitLabel``, ``componentNames``,
``description``), which the table storage node writes to its ``.schema.tsv`` sidecar, so they
survive a .mrb save and reload. Parameter columns (``BV/TV``, ``Tb.Th`` ...) get their
units from :data:`ctsma.PARAMETER_UNITS` unless told otherwise.
"""

from __future__ import annotations

import math

import numpy as np

from ctsma import PARAMETER_UNITS


def _as_dataframe(table):
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        return table
    rows = list(table)
    return pd.DataFrame.from_records(rows) if rows else pd.DataFrame()


def _vtk_column(name: str, values):
    import vtk
    from pandas.api import types as ptypes

    if ptypes.is_bool_dtype(values):
        arr = vtk.vtkBitArray()
        cast = int
    elif ptypes.is_integer_dtype(values):
        arr = vtk.vtkLongLongArray()
        cast = int
    elif ptypes.is_numeric_dtype(values):
        arr = vtk.vtkDoubleArray()
        cast = float
    else:
        arr = vtk.vtkStringArray()
        cast = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)  # noqa: E731
    arr.SetName(str(name))
    arr.SetNumberOfValues(len(values))
    for i, v in enumerate(values.tolist()):
        arr.SetValue(i, cast(v))
    return arr


def table_to_node(table, scene, name: str = "Table", node=None, units: dict[str, str] | None = None,
                  descriptions: dict[str, str] | None = None):
    """Fill a (new or given) ``vtkMRMLTableNode`` from rows of dicts or a DataFrame."""
    df = _as_dataframe(table)
    units = {**{k: v for k, v in PARAMETER_UNITS.items() if v}, **(units or {})}
    descriptions = descriptions or {}
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    was_modifying = node.StartModify()
    try:
        node.RemoveAllColumns()
        for col in df.columns:
            node.AddColumn(_vtk_column(col, df[col]))
            if units.get(str(col)):
                node.SetColumnUnitLabel(str(col), units[str(col)])
            if descriptions.get(str(col)):
                node.SetColumnDescription(str(col), descriptions[str(col)])
        node.SetUseColumnTitleAsColumnHeader(True)
    finally:
        node.EndModify(was_modifying)
    return node


def node_to_dataframe(node):
    """A table node as ``(DataFrame, {column: unit})`` (columns without a unit are left out)."""
    import pandas as pd
    import vtk

    table = node.GetTable()
    data, units = {}, {}
    for c in range(table.GetNumberOfColumns()):
        column = table.GetColumn(c)
        name = column.GetName()
        values = [column.GetValue(r) for r in range(column.GetNumberOfValues())]
        if isinstance(column, vtk.vtkBitArray):
            values = np.array(values, dtype=bool)
        elif isinstance(column, vtk.vtkStringArray):
            values = np.array(values, dtype=object)
        elif column.GetDataType() in (vtk.VTK_FLOAT, vtk.VTK_DOUBLE):
            values = np.array(values, dtype=float)
        else:
            values = np.array(values, dtype=np.int64)
        data[name] = values
        unit = node.GetColumnUnitLabel(name)
        if unit:
            units[name] = unit
    return pd.DataFrame(data), units
