"""Regenerate the CT-SMA colour tables (Slicer colour-table text format) from matplotlib's perceptual maps.

Run from the repository root: ``python Resources/ColorTables/make_tables.py``.
"""

from pathlib import Path

import matplotlib

HERE = Path(__file__).resolve().parent
MAPS = {"CTSMA_BVTV": "viridis", "CTSMA_TbTh": "magma", "CTSMA_TbSp": "cividis", "CTSMA_TbN": "plasma",
        "CTSMA_Uncertainty": "inferno"}

for name, cmap_name in MAPS.items():
    cmap = matplotlib.colormaps[cmap_name]
    lines = [f"# CT-SMA colour table {name} (matplotlib '{cmap_name}', perceptual), 256 entries",
             "# index name R G B A"]
    for i in range(256):
        r, g, b, _ = cmap(i / 255)
        lines.append(f"{i} {name}_{i} {round(r * 255)} {round(g * 255)} {round(b * 255)} 255")
    (HERE / f"{name}.txt").write_text("\n".join(lines) + "\n")
