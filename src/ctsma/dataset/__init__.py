"""Paired CT/MR patch datasets: the on-disk patch store and its torch loader."""

from .store import (COLUMNS, DEFAULT_CT_SHAPE, DEFAULT_EXTENT_MM, DEFAULT_MR_SHAPE, MR_COLUMNS, TRUE_COLUMNS,
                    PatchStore, PatchStoreError, PatchStoreWriter, Split)

__all__ = ["PatchStore", "PatchStoreWriter", "PatchStoreError", "Split", "COLUMNS", "MR_COLUMNS", "TRUE_COLUMNS",
           "DEFAULT_CT_SHAPE", "DEFAULT_MR_SHAPE", "DEFAULT_EXTENT_MM"]
