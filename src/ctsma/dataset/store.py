"""The patch store: paired CT and MR patches with their reference parameters, on disk.

Layout of a store folder ``DIR`` (format version 1)::

    DIR/patches.h5    /ct       float32 (N,1,Dc,Dc,Dc)  CT patch in HU
                      /mr       float32 (N,1,Dm,Dm,Dm)  MR patch, normalised per knee (attrs["mr_normalisation"])
                      /ct_mask  uint8   (N,1,Dc,Dc,Dc)  ROI mask inside the CT patch
                      /mr_mask  uint8   (N,1,Dm,Dm,Dm)  ROI mask inside the MR patch
                      attrs: version, ct_spacing_mm, mr_spacing_mm, extent_mm, plus whatever the builder adds
    DIR/patches.csv   one row per patch, row i <-> array index i (columns: :data:`COLUMNS`)
    DIR/summary.json  counts, subjects, per-parameter statistics, the attrs

Patch arrays are (z, y, x) voxel order, the same axis order for CT and MR (both patches are axis-aligned cubes of
``extent_mm`` centred on the same physical point, CT grid), so a flip applied to both keeps them paired.

The writer (:meth:`PatchStore.create`) appends in chunks to temporary files and :meth:`PatchStoreWriter.finalize`
renames them into place, so a reader never sees a half-written store. The reader (:class:`PatchStore`) opens the
HDF5 lazily; :meth:`PatchStore.arrays` loads whole datasets into RAM when they fit a memory budget (the demo store
does), otherwise :class:`PatchDataset` reads sorted index batches from the file.

Splits are always by PATIENT (subject), never by patch: :meth:`PatchStore.patient_split`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .. import PARAMETERS
from ..errors import UserError
from ..io.atomic import write_json

STORE_VERSION = 1
H5_NAME, CSV_NAME, SUMMARY_NAME = "patches.h5", "patches.csv", "summary.json"
ARRAYS = ("ct", "mr", "ct_mask", "mr_mask")
DEFAULT_EXTENT_MM = 8.0
DEFAULT_CT_SHAPE = 16   # 0.5 mm
DEFAULT_MR_SHAPE = 32   # 0.25 mm

MR_COLUMNS = tuple(f"mr_{p}" for p in PARAMETERS)
TRUE_COLUMNS = tuple(f"true_{p}" for p in PARAMETERS)
COLUMNS = ("index", "subject", "roi", "centre_x", "centre_y", "centre_z", "rel_x", "rel_y", "rel_z",
           *MR_COLUMNS, *TRUE_COLUMNS, "split", "fold")
REQUIRED_ROW_KEYS = ("subject", "roi", "centre_x", "centre_y", "centre_z", *MR_COLUMNS)
SPLITS = ("train", "val", "test")


class PatchStoreError(UserError):
    """A patch store is missing, incomplete or inconsistent."""


def _cube(shape: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),) * 3
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise PatchStoreError(f"patch shape must be three positive sizes, not {shape}")
    return shape  # type: ignore[return-value]


def _remove_dead_partials(directory: Path) -> None:
    """Delete the temporary store files of writers that were killed (their process, named in the file, is gone)."""
    from ..io.atomic import pid_alive
    for name in (H5_NAME, CSV_NAME):
        for left in directory.glob(f".{name}.partial-*"):
            pid = left.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                left.unlink(missing_ok=True)


class PatchStoreWriter:
    """Appends patches to a new store; nothing is visible at ``dir`` until :meth:`finalize`."""

    def __init__(self, directory: Path, ct_shape, mr_shape, attrs: Mapping[str, Any], chunk: int):
        import h5py

        self.dir = directory
        self.ct_shape, self.mr_shape = _cube(ct_shape), _cube(mr_shape)
        self.dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(self.dir)
        self._tmp_h5 = self.dir / f".{H5_NAME}.partial-{os.getpid()}"
        self._rows: list[dict] = []
        self._n = 0
        self._fh = h5py.File(self._tmp_h5, "w")
        a = {"version": STORE_VERSION, "extent_mm": DEFAULT_EXTENT_MM,
             "ct_spacing_mm": DEFAULT_EXTENT_MM / self.ct_shape[0], "mr_spacing_mm": DEFAULT_EXTENT_MM / self.mr_shape[0],
             "mr_normalisation": "unspecified"}
        a.update(dict(attrs or {}))
        for k, v in a.items():
            self._fh.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
        self.attrs = a
        for name, shp, dt in (("ct", self.ct_shape, "f4"), ("mr", self.mr_shape, "f4"),
                              ("ct_mask", self.ct_shape, "u1"), ("mr_mask", self.mr_shape, "u1")):
            self._fh.create_dataset(name, shape=(0, 1, *shp), maxshape=(None, 1, *shp), dtype=dt,
                                    chunks=(chunk, 1, *shp))

    def append(self, ct, mr, ct_mask, mr_mask, rows: Iterable[Mapping[str, Any]] | Any) -> int:
        """Append a batch of ``n`` patches (arrays shaped (n,1,D,D,D) or (n,D,D,D)) and their ``n`` table rows.

        Each row needs ``subject, roi, centre_x/y/z, mr_<param>``; ``rel_x/y/z``, ``true_<param>``, ``split``
        and ``fold`` are optional. Returns the number of patches now in the store.
        """
        if self._fh is None:
            raise PatchStoreError("this patch store was already finalised")
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict("records")
        rows = [dict(r) for r in rows]
        n = len(rows)
        batch = {}
        for name, arr, shp in (("ct", ct, self.ct_shape), ("mr", mr, self.mr_shape),
                               ("ct_mask", ct_mask, self.ct_shape), ("mr_mask", mr_mask, self.mr_shape)):
            arr = np.asarray(arr)
            if arr.ndim == 4:
                arr = arr[:, None]
            if arr.shape != (n, 1, *shp):
                raise PatchStoreError(f"{name} batch has shape {arr.shape}; expected {(n, 1, *shp)} for {n} rows")
            if name in ("ct", "mr") and not np.all(np.isfinite(arr)):
                raise PatchStoreError(f"{name} batch holds NaN or infinite values")
            batch[name] = arr
        for r in rows:
            missing = [k for k in REQUIRED_ROW_KEYS if k not in r]
            if missing:
                raise PatchStoreError(f"patch row lacks {', '.join(missing)}")
            unknown = sorted(set(r) - set(COLUMNS))
            if unknown:
                raise PatchStoreError(f"patch row has unknown column(s) {', '.join(unknown)} (allowed: {', '.join(COLUMNS)})")
        for name, arr in batch.items():
            ds = self._fh[name]
            ds.resize(self._n + n, axis=0)
            ds[self._n:self._n + n] = arr.astype(ds.dtype, copy=False)
        for i, r in enumerate(rows):
            r["index"] = self._n + i
            self._rows.append(r)
        self._n += n
        return self._n

    def finalize(self) -> "PatchStore":
        """Write the table and summary, rename everything into place, and return the opened store."""
        import pandas as pd

        if self._fh is None:
            raise PatchStoreError("this patch store was already finalised")
        if self._n == 0:
            self.abort()
            raise PatchStoreError("no patches were appended; the store was not written")
        self._fh.attrs["n_patches"] = self._n
        self._fh.close()
        self._fh = None
        table = pd.DataFrame(self._rows)
        for c in COLUMNS:
            if c not in table:
                table[c] = "" if c == "split" else np.nan
        table = table[list(COLUMNS)]
        table["split"] = table["split"].fillna("").astype(str)
        bad = sorted(set(table["split"]) - set(SPLITS) - {""})
        if bad:
            os.unlink(self._tmp_h5)
            raise PatchStoreError(f"unknown split value(s) {bad}; use {', '.join(SPLITS)} or leave empty")
        tmp_csv = self.dir / f".{CSV_NAME}.partial-{os.getpid()}"
        table.to_csv(tmp_csv, index=False)
        # h5 first, csv last: a reader checks both exist and agree on N.
        os.replace(self._tmp_h5, self.dir / H5_NAME)
        os.replace(tmp_csv, self.dir / CSV_NAME)
        write_json(self.dir / SUMMARY_NAME, summarise(table, self.attrs, self.ct_shape, self.mr_shape))
        return PatchStore(self.dir)

    def abort(self) -> None:
        """Drop the partial store (temporary files removed)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp_h5.exists():
            self._tmp_h5.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif self._fh is not None:
            self.finalize()


def summarise(table, attrs: Mapping[str, Any], ct_shape, mr_shape) -> dict:
    """The summary.json document: counts, subjects and per-parameter statistics of a store table."""
    stats = {}
    for p in PARAMETERS:
        for prefix in ("mr", "true"):
            v = table[f"{prefix}_{p}"].astype(float).to_numpy()
            v = v[np.isfinite(v)]
            if v.size:
                stats.setdefault(prefix, {})[p] = {"mean": float(v.mean()), "sd": float(v.std()),
                                                   "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}
    return {"version": STORE_VERSION, "n_patches": int(len(table)), "n_subjects": int(table["subject"].nunique()),
            "subjects": sorted(map(str, table["subject"].unique())),
            "patches_per_roi": {str(k): int(v) for k, v in table["roi"].value_counts().sort_index().items()},
            "splits": {str(k): int(v) for k, v in table["split"].value_counts().items() if k},
            "ct_shape": list(ct_shape), "mr_shape": list(mr_shape),
            "attrs": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in attrs.items()},
            "parameters": stats}


@dataclass
class Split:
    """Patch indices of a patient-level split, and the subjects in each part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    subjects: dict

    def indices(self, part: str) -> np.ndarray:
        return getattr(self, part)


class PatchStore:
    """A finished patch store, opened lazily (the HDF5 file is opened on first array access)."""

    def __init__(self, directory: str | os.PathLike):
        import pandas as pd

        self.dir = Path(directory)
        h5, csv = self.dir / H5_NAME, self.dir / CSV_NAME
        if not self.dir.is_dir():
            raise PatchStoreError(f"patch store folder not found: {self.dir}")
        if not h5.is_file() or not csv.is_file():
            raise PatchStoreError(f"{self.dir} is not a finished patch store (needs {H5_NAME} and {CSV_NAME}; "
                                  "build one with 'ctsma dataset')")
        self.table = pd.read_csv(csv, dtype={"subject": str, "roi": str, "split": str}, keep_default_na=False,
                                 na_values={c: [""] for c in COLUMNS if c not in ("subject", "roi", "split")})
        missing = [c for c in COLUMNS if c not in self.table]
        if missing:
            raise PatchStoreError(f"{csv.name} lacks column(s) {', '.join(missing)}")
        for c in COLUMNS:  # a value edited by hand: pandas' 'could not convert string to float' traceback in training
            if c not in ("subject", "roi", "split") and not pd.api.types.is_numeric_dtype(self.table[c]):
                v = self.table[c]
                bad = v[pd.to_numeric(v, errors="coerce").isna() & v.notna()]
                if not len(bad):  # text that reads as numbers: take them as numbers
                    self.table[c] = pd.to_numeric(v)
                    continue
                raise PatchStoreError(f"{csv.name}: column {c} holds {bad.iloc[0]!r} on line {bad.index[0] + 2} "
                                      "(the header is line 1), not a number; correct the file or rebuild the store")
        self._h5 = None
        self._h5_pid = None
        self._cache: dict[str, np.ndarray] = {}
        fh = self._file()
        self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in fh.attrs.items()}
        if int(self.attrs.get("version", -1)) != STORE_VERSION:
            raise PatchStoreError(f"{self.dir} has store version {self.attrs.get('version')}; "
                                  f"this CT-SMA reads version {STORE_VERSION}")
        n = fh["ct"].shape[0]
        if n != len(self.table):
            raise PatchStoreError(f"{self.dir}: {H5_NAME} holds {n} patches but {CSV_NAME} has {len(self.table)} rows")
        self.ct_shape = tuple(fh["ct"].shape[2:])
        self.mr_shape = tuple(fh["mr"].shape[2:])

    def __len__(self) -> int:
        return len(self.table)

    def fingerprint(self) -> str:
        """SHA-256 of the store's table and summary: its patch centres, references and splits, the builder's settings
        and each knee's provenance. It tells one build of a store from another (e.g. rebuilt in its folder with other
        settings) without reading the arrays; a store moved to another folder keeps it."""
        h = hashlib.sha256()
        for name in (CSV_NAME, SUMMARY_NAME):
            path = self.dir / name
            h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b""))
        return h.hexdigest()

    def _file(self):
        import h5py

        if self._h5 is None or self._h5_pid != os.getpid():  # reopen in forked loader workers
            try:
                self._h5 = h5py.File(self.dir / H5_NAME, "r")
            except OSError as exc:  # truncated or not HDF5
                raise PatchStoreError(f"{self.dir / H5_NAME} is damaged or not an HDF5 file "
                                      f"({str(exc).splitlines()[0][:120]}); rebuild the store") from None
            self._h5_pid = os.getpid()
        return self._h5

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = None
        return state

    @property
    def subjects(self) -> list[str]:
        return sorted(self.table["subject"].unique())

    def arrays(self, names: Sequence[str] = ARRAYS, budget_bytes: float = 4e9) -> dict[str, np.ndarray] | None:
        """Whole arrays in RAM (read once, contiguous), or ``None`` if they exceed ``budget_bytes``."""
        fh = self._file()
        need = sum(fh[a].size * fh[a].dtype.itemsize for a in names if a not in self._cache)
        if need > budget_bytes:
            return None
        for a in names:
            if a not in self._cache:
                self._cache[a] = fh[a][...]
        return {a: self._cache[a] for a in names}

    def read(self, name: str, indices) -> np.ndarray:
        """Rows ``indices`` of one array (from the RAM cache when loaded, else sorted HDF5 reads)."""
        idx = np.asarray(indices, dtype=np.int64)
        if name in self._cache:
            return self._cache[name][idx]
        order = np.argsort(idx)
        sorted_idx = idx[order]
        uniq, inv = np.unique(sorted_idx, return_inverse=True)
        ds = self._file()[name]
        # h5py's fancy (point) selection is slow; read each run of consecutive rows as one slice instead
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        runs = np.split(uniq, breaks)
        try:
            data = np.concatenate([ds[r[0]:r[-1] + 1] for r in runs]) if len(runs) > 1 else ds[uniq[0]:uniq[-1] + 1]
        except OSError as exc:  # a store truncated after it was opened
            raise PatchStoreError(f"{self.dir / H5_NAME} cannot be read ({str(exc).splitlines()[0][:120]}); "
                                  "rebuild the store") from None
        out = np.empty_like(data[inv])
        out[order] = data[inv]
        return out

    def targets(self, source: str = "mr") -> np.ndarray:
        """(N,4) reference parameters in physical units: ``source`` ``mr`` (MR morphometry) or ``true``."""
        return self.table[[f"{source}_{p}" for p in PARAMETERS]].to_numpy(dtype=np.float64)

    def patient_split(self, test_fraction: float = 0.25, val_fraction: float = 0.2, *, k: int | None = None,
                      fold: int | None = None, seed: int = 0, use_stored: bool = True) -> Split:
        """Split patch indices by PATIENT into train/val/test.

        If the table already carries a complete ``split`` column (the builder's choice), ``use_stored`` is true and
        no ``k`` asks for patient folds, that is used. Otherwise subjects are shuffled with ``seed``: with ``k`` and ``fold`` given, fold ``fold`` of
        ``k`` patient folds is the test set; else the first ``test_fraction`` of subjects. ``val_fraction`` of the
        remaining subjects are validation. A patient is never in two parts.
        """
        subj = self.table["subject"].astype(str).to_numpy()
        stored = self.table["split"].astype(str).to_numpy()
        if use_stored and k is None and np.all(np.isin(stored, SPLITS)):
            parts = {s: np.flatnonzero(stored == s) for s in SPLITS}
            for a in SPLITS:
                for b in SPLITS:
                    if a < b and set(subj[parts[a]]) & set(subj[parts[b]]):
                        raise PatchStoreError(f"stored split mixes patients between '{a}' and '{b}'")
        else:
            subjects = np.array(sorted(set(subj)))
            rng = np.random.default_rng(seed)
            rng.shuffle(subjects)
            ns = len(subjects)
            if k is not None:
                if fold is None or not (2 <= k <= ns) or not (0 <= fold < k):
                    raise PatchStoreError(f"k-fold split needs 2 <= k <= {ns} subjects and 0 <= fold < k "
                                          f"(got k={k}, fold={fold})")
                test_s = subjects[np.arange(ns) % k == fold]
            else:
                if not 0 <= test_fraction < 1:
                    raise PatchStoreError(f"test_fraction must be in [0, 1), not {test_fraction}")
                test_s = subjects[:int(round(test_fraction * ns))]
            rest = np.array([s for s in subjects if s not in set(test_s)])
            n_val = int(round(val_fraction * len(rest)))
            if val_fraction > 0 and len(rest) >= 2:
                n_val = max(1, n_val)
            val_s, train_s = rest[:n_val], rest[n_val:]
            parts = {"train": np.flatnonzero(np.isin(subj, train_s)), "val": np.flatnonzero(np.isin(subj, val_s)),
                     "test": np.flatnonzero(np.isin(subj, test_s))}
        subjects_by = {s: sorted(set(subj[parts[s]])) for s in SPLITS}
        return Split(parts["train"], parts["val"], parts["test"], subjects_by)

    def summary(self) -> dict:
        p = self.dir / SUMMARY_NAME
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
        return summarise(self.table, self.attrs, self.ct_shape, self.mr_shape)

    @staticmethod
    def create(directory: str | os.PathLike, ct_shape=DEFAULT_CT_SHAPE, mr_shape=DEFAULT_MR_SHAPE,
               attrs: Mapping[str, Any] | None = None, *, chunk: int = 64) -> PatchStoreWriter:
        """Start writing a new store in ``directory`` (an existing store there is replaced at finalize)."""
        return PatchStoreWriter(Path(directory), ct_shape, mr_shape, attrs or {}, chunk)

