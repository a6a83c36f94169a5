"""Validated image input and atomic image output (SimpleITK, LPS millimetres).

Every entry point reads images through :func:`read_image`, so that a user gets the same
clear message for the same problem everywhere: missing or corrupt files, 2D/4D images,
non-finite voxels, bad spacing or direction, or an image too large for the memory budget.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputImageError, MemoryBudgetError
from .atomic import atomic_path

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PADDING_HU = -1500.0  # below this a CT voxel is padding (outside the reconstruction circle: -2048, -3024, ...)
AIR_FLOOR_HU = -1024.0  # CT patches are floored here, as 12-bit CT stores air (and the phantom's CTs are clipped)
SLICE_THICKNESS_TAG = "0018|0050"  # DICOM SliceThickness (ctsma.harmonise)
KEPT_DICOM_TAGS = (SLICE_THICKNESS_TAG,)  # kept on an image read from a DICOM series

DEFAULT_MAX_VOXELS = int(os.environ.get("CTSMA_MAX_VOXELS", 2_000_000_000 // 4))
"""Default size limit for an input image (voxels), from the memory budget (float32: 2 GB)."""


# File names that say what an image is, not whose: such a file is named after its folder (P0001/ct.nii.gz -> P0001).
_GENERIC_STEMS = {"ct", "image", "scan", "volume"}


def subject_from_path(path) -> str:
    """The subject a CT path names when none is given: its file name without the image suffix; a DICOM folder (also
    given as '.') by its name; a generically named file (``ct.nii.gz``, as the phantom and the contract write it)
    by its folder."""
    p = Path(os.path.abspath(str(path)))
    name = p.name
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.casefold().endswith(suf):
            name = name[: -len(suf)]
            break
    if name.casefold() in _GENERIC_STEMS and p.parent.name:
        return p.parent.name
    return name


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.7g}" for x in v) + ")"


def _dicom_reader(folder: Path, what: str) -> sitk.ImageSeriesReader:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputImageError(f"{what} {folder} is a folder with no DICOM series in it")
    files_by_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    wanted = what.split()[0].upper() if what.split() else ""
    if len(series) > 1 and wanted in ("CT", "MR"):  # a study folder holding both: the series of the asked modality
        same = {sid: f for sid, f in files_by_series.items() if _dicom_modality(f[0]) == wanted}
        if same and len(same) < len(files_by_series):
            warnings.warn(f"{folder} holds {len(series)} DICOM series; reading the {wanted} one"
                          f"{'s' if len(same) > 1 else ''} only", stacklevel=3)
            files_by_series, series = same, list(same)
    sid = max(files_by_series, key=lambda s: len(files_by_series[s]))
    tied = [s for s in files_by_series if len(files_by_series[s]) == len(files_by_series[sid])]
    if len(tied) > 1:  # no rule would choose between them: the user must
        raise InputImageError(f"{what} {folder} holds {len(tied)} DICOM series of {len(files_by_series[sid])} files "
                              f"each ({', '.join(sorted(tied))}); put the one to analyse in a folder of its own")
    if len(series) > 1:
        warnings.warn(f"{folder} holds {len(series)} DICOM series; using the largest ({sid}, "
                      f"{len(files_by_series[sid])} files)", stacklevel=3)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_by_series[sid])
    return reader


def _dicom_modality(path: str) -> str:
    """The Modality (0008,0060) of one DICOM file, upper case ('' when unreadable or absent)."""
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    try:
        r.ReadImageInformation()
        return r.GetMetaData("0008|0060").strip().upper() if r.HasMetaDataKey("0008|0060") else ""
    except RuntimeError:
        return ""


def read_image(path: str | os.PathLike, *, what: str = "image", pixel_type=sitk.sitkFloat32,
               max_voxels: int | None = None, allow_2d: bool = False) -> sitk.Image:
    """Read a 3D scalar image (NIfTI, NRRD, MHA or a DICOM series folder) and validate it.

    Raises :class:`InputImageError` (a user error) with a one-line explanation when the file
    is missing, unreadable, not 3D scalar, has non-finite voxels, bad spacing or a
    non-orthogonal direction, and :class:`MemoryBudgetError` when it is larger than
    ``max_voxels`` (checked from the header, before the pixels are read).
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{what} not found: {path}")
    if max_voxels is None:  # the environment is read at call time, so a caller (or test) may change it
        max_voxels = int(os.environ.get("CTSMA_MAX_VOXELS", DEFAULT_MAX_VOXELS))
    keep = {}
    warn_display = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's console warnings: the checks here say it better
    try:
        if path.is_dir():
            reader = _dicom_reader(path, what)
            n_files = len(reader.GetFileNames())
            first = sitk.ImageFileReader()
            first.SetFileName(reader.GetFileNames()[0])
            first.ReadImageInformation()
            n_vox = int(np.prod(first.GetSize())) * n_files
            keep = {k: first.GetMetaData(k) for k in KEPT_DICOM_TAGS if first.HasMetaDataKey(k)}
            reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the check after reading
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            n_vox = int(np.prod(reader.GetSize()))
            dim = reader.GetDimension()
            size = reader.GetSize()
            eff_dim = sum(1 for s in size if s > 1) if dim > 3 else dim
            if dim > 3 and eff_dim > 3:
                raise InputImageError(f"{what} {path.name} is {dim}D {tuple(size)}; a 3D image is required")
            if reader.GetNumberOfComponents() > 1:
                raise InputImageError(f"{what} {path.name} has {reader.GetNumberOfComponents()} components "
                                      "per voxel; a scalar (grey-level) image is required")
        if n_vox > max_voxels:
            raise MemoryBudgetError(
                f"{what} {path.name} has {n_vox:,} voxels, over the memory budget of {max_voxels:,} voxels "
                "(set CTSMA_MAX_VOXELS to raise the limit, or crop the image)")
        if not path.is_dir() and path.name.lower().endswith((".nii", ".nii.gz")):
            # ITK zero-fills a truncated or corrupted NIfTI payload without a word, so the payload is read again
            # here; in a second thread while ITK reads (both decompress without the GIL), which halves the time
            # of reading a compressed CT. ITK's own error, if any, is the one reported, as when run one after the
            # other.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=1) as ex:
                payload = ex.submit(_check_nifti_payload, path, what)
                img = reader.Execute()
            payload.result()
        else:
            img = reader.Execute()
        if path.is_dir():
            _check_slice_positions(reader, img, f"{what} {path.name}")
    except (InputImageError, MemoryBudgetError):
        raise
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()
        reason = next((ln for ln in reversed(reason) if ln.strip()), "unknown reason")
        raise InputImageError(f"cannot read {what} {path}: the file is corrupted or not an image "
                              f"({reason.strip()[:200]})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn_display)
    if img.GetDimension() == 4:
        img = _squeeze_4d(img, what, path.name)
    img = check_image(img, what=f"{what} {path.name}", pixel_type=pixel_type, allow_2d=allow_2d)
    for k, v in keep.items():
        img.SetMetaData(k, v)
    return img


def _check_slice_positions(reader: sitk.ImageSeriesReader, img: sitk.Image, what: str) -> None:
    """Refuse a DICOM series with missing, duplicated or unevenly spaced slices: ITK reads it as if evenly spaced
    (with the warnings silenced here), which would put every structure at the wrong height."""
    n = len(reader.GetFileNames())
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
    except (RuntimeError, ValueError):
        return  # no ImagePositionPatient: nothing to check against
    if n < 3 or pos.shape != (n, 3):
        return
    normal = np.asarray(img.GetDirection()).reshape(3, 3)[:, 2]
    gaps = np.diff(np.sort(pos @ normal))
    step = float(np.median(gaps))
    if step <= 0 or np.abs(gaps - step).max() > max(0.11, 0.2 * step):  # (positions rounded to 0.1 mm pass)
        raise InputImageError(
            f"{what} has missing, duplicated or unevenly spaced slices (gaps {gaps.min():.3g} to {gaps.max():.3g} "
            f"mm between {n} slices); export the whole series, or resample it to even slices first")


_NIFTI_FLOAT_TYPES = {16: np.float32, 64: np.float64}


def _check_nifti_payload(path: Path, what: str) -> None:
    """Check that a NIfTI-1 file holds all its voxels and, for float data, no NaN/inf.

    ITK's NIfTI reader silently zero-fills a truncated file and turns NaN voxels into 0, so
    this reads the raw payload (streamed, gzip or not) itself.
    """
    import gzip
    import struct
    import zlib

    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as fh:
            hdr = fh.read(348)
            if len(hdr) < 348:
                raise InputImageError(f"cannot read {what} {path}: the file is truncated (incomplete header)")
            endian = "<" if struct.unpack("<i", hdr[:4])[0] == 348 else ">"
            if struct.unpack(endian + "i", hdr[:4])[0] != 348:
                return  # NIfTI-2 or unknown: ITK's own checks apply
            dims = struct.unpack(endian + "8h", hdr[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", hdr[70:74])
            _check_nifti_geometry(hdr, endian, dims, path, what)
            raw_offset = struct.unpack(endian + "f", hdr[108:112])[0]
            if not np.isfinite(raw_offset) or not 0 <= raw_offset < 2**40:
                raise InputImageError(f"cannot read {what} {path}: the NIfTI header is corrupted "
                                      f"(data offset vox_offset = {raw_offset})")
            vox_offset = int(raw_offset) or 352
            n_vox = int(np.prod([max(1, d) for d in dims[1:1 + max(1, dims[0])]], dtype=np.int64))
            expected = n_vox * bitpix // 8
            skip = max(0, vox_offset - 348)
            while skip > 0:  # in chunks: a corrupted offset must end in "truncated", not in a huge allocation
                step = fh.read(min(1 << 24, skip))
                if not step:
                    break
                skip -= len(step)
            dtype = _NIFTI_FLOAT_TYPES.get(datatype)
            got, bad, carry = 0, 0, b""
            item = bitpix // 8 if bitpix else 1
            while got < expected:
                chunk = fh.read(min(1 << 24, expected - got))
                if not chunk:
                    break
                got += len(chunk)
                if dtype is not None:
                    buf = carry + chunk
                    usable = len(buf) - len(buf) % item
                    arr = np.frombuffer(buf[:usable], dtype=np.dtype(dtype).newbyteorder(endian))
                    bad += int(arr.size - np.count_nonzero(np.isfinite(arr)))
                    carry = buf[usable:]
    except (EOFError, OSError, zlib.error) as exc:
        raise InputImageError(f"cannot read {what} {path}: the file is truncated or corrupted ({exc})") from None
    if got < expected:
        raise InputImageError(f"cannot read {what} {path}: the file is truncated "
                              f"({got:,} of {expected:,} data bytes present)")
    if bad:
        raise InputImageError(f"{what} {path.name} has {bad:,} non-finite voxels (NaN or inf)")


def _check_nifti_geometry(hdr: bytes, endian: str, dims, path: Path, what: str) -> None:
    """Refuse a NIfTI-1 header whose geometry ITK would silently "repair".

    ITK reads a zero ``pixdim`` as 1 mm and coerces a sheared ``sform`` to an orthogonal one
    (only a console warning), so the image would be analysed on a wrong grid.
    """
    import struct

    n = min(3, max(1, dims[0]))
    pixdim = np.array(struct.unpack(endian + "8f", hdr[76:108])[1:1 + n], float)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InputImageError(f"{what} {path.name} has invalid voxel spacing {_fmt(pixdim)} mm in its NIfTI header "
                              "(pixdim); all must be > 0")
    sform_code = struct.unpack(endian + "h", hdr[254:256])[0]
    if sform_code > 0:
        m = np.array(struct.unpack(endian + "12f", hdr[280:328]), float).reshape(3, 4)[:, :3]
        norms = np.linalg.norm(m, axis=0)
        if not np.all(np.isfinite(m)) or np.any(norms == 0):
            raise InputImageError(f"{what} {path.name} has a degenerate sform matrix in its NIfTI header")
        cos = m / norms
        if not np.allclose(cos.T @ cos, np.eye(3), atol=1e-3):
            raise InputImageError(f"{what} {path.name} has a non-orthogonal direction matrix (sheared sform); "
                                  "resample it to an orthogonal grid first")


def _squeeze_4d(img: sitk.Image, what: str, name: str) -> sitk.Image:
    size = list(img.GetSize())
    if size[3] != 1:
        raise InputImageError(f"{what} {name} is 4D {tuple(size)}; a 3D image is required")
    return sitk.Extract(img, size[:3] + [0], [0, 0, 0, 0])


def check_image(img: sitk.Image, *, what: str = "image", pixel_type=sitk.sitkFloat32,
                allow_2d: bool = False, allow_nonfinite: bool = False) -> sitk.Image:
    """Validate an in-memory image and cast it to ``pixel_type`` (``None`` keeps its type)."""
    dim = img.GetDimension()
    size = img.GetSize()
    if dim == 2 or (dim == 3 and min(size) == 1 and not allow_2d):
        if not allow_2d:
            raise InputImageError(f"{what} is 2D (size {tuple(size)}); a 3D volume is required")
    elif dim != 3:
        raise InputImageError(f"{what} is {dim}D; a 3D image is required")
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise InputImageError(f"{what} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                              "a scalar image is required")
    spacing = np.asarray(img.GetSpacing(), float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputImageError(f"{what} has invalid voxel spacing {_fmt(spacing)} mm; all must be > 0")
    direction = np.asarray(img.GetDirection(), float).reshape(dim, dim)
    if not np.allclose(direction @ direction.T, np.eye(dim), atol=1e-4):
        raise InputImageError(f"{what} has a non-orthogonal direction matrix (sheared geometry); "
                              "resample it to an orthogonal grid first")
    if not np.all(np.isfinite(img.GetOrigin())):
        raise InputImageError(f"{what} has a non-finite origin")
    if pixel_type is not None and img.GetPixelID() != pixel_type:
        img = sitk.Cast(img, pixel_type)
    if not allow_nonfinite and img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(img)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise InputImageError(f"{what} has {bad:,} non-finite voxels (NaN or inf)")
    return img


GRID_TOLERANCE_VOX = 0.05
"""Two grids of the same size whose voxel centres lie within this fraction of a voxel of each other everywhere are
the same grid: rounding of spacing, origin or direction in a file header (NIfTI stores them as float32) stays far
below it, and nearest-neighbour resampling between such grids would copy every voxel unchanged."""


def grid_offset_voxels(a, b) -> float:
    """How far apart the same voxel index lies on the grids of ``a`` and ``b`` (SimpleITK images or anything with
    ``GetSize/GetSpacing/GetOrigin/GetDirection``), at worst over the image, in voxels of ``a``'s finest spacing;
    ``inf`` when the sizes differ. A spacing off by a relative ``e`` moves the far corner by ``e`` times the
    image's size in voxels, so this catches what a per-field tolerance in mm would miss at fine spacings."""
    size = tuple(int(v) for v in a.GetSize())
    if size != tuple(int(v) for v in b.GetSize()):
        return float("inf")
    corners = np.array(np.meshgrid(*[[0.0, n - 1.0] for n in size], indexing="ij")).reshape(len(size), -1)

    def physical(img):
        d = np.asarray(img.GetDirection(), float).reshape(len(size), len(size))
        return np.asarray(img.GetOrigin(), float)[:, None] + d @ (np.asarray(img.GetSpacing(), float)[:, None]
                                                                   * corners)
    return float(np.linalg.norm(physical(a) - physical(b), axis=0).max() / min(a.GetSpacing()))


def same_grid(a, b, tol_vox: float = GRID_TOLERANCE_VOX) -> bool:
    """Whether ``a`` and ``b`` share one grid (see :data:`GRID_TOLERANCE_VOX`)."""
    return grid_offset_voxels(a, b) <= tol_vox


def check_same_geometry(a: sitk.Image, b: sitk.Image, *, what_a: str = "image",
                        what_b: str = "segmentation") -> None:
    """Raise :class:`InputImageError` unless ``a`` and ``b`` share one grid (:func:`same_grid`), naming what
    differs: size, spacing, origin or direction."""
    offset = grid_offset_voxels(a, b)
    if offset <= GRID_TOLERANCE_VOX:
        return
    if a.GetSize() != b.GetSize():
        problems = [f"size {b.GetSize()} against the {what_a}'s {a.GetSize()}"]
    else:
        problems = [f"{name} {_fmt(get(b))} against the {what_a}'s {_fmt(get(a))}" for name, get in
                    (("spacing", lambda i: i.GetSpacing()), ("origin", lambda i: i.GetOrigin()))
                    if not np.allclose(get(a), get(b), rtol=1e-9, atol=0)]
        if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-9):
            problems.append("direction differs")
        problems.append(f"the same voxel lies up to {offset:.3g} voxels apart")
    raise InputImageError(f"{what_b} does not match the geometry of the {what_a}: " + "; ".join(problems))


def check_ct_intensities(img: sitk.Image, *, what: str = "CT") -> None:
    """Refuse an image whose intensities are not plausible Hounsfield units (an MR given as CT).

    A CT in HU has air or fat well below zero and bone well above; MR magnitudes are never negative. Padding
    (below :data:`PADDING_HU`: what scanners write outside the reconstruction circle) is left out.
    """
    arr = sitk.GetArrayViewFromImage(img)
    sample = arr.ravel()[:: max(1, arr.size // 2_000_000)]
    sample = sample[sample >= PADDING_HU]
    if not sample.size:
        raise InputImageError(f"{what} holds padding only (every voxel below {PADDING_HU:.0f} HU)")
    lo, hi = np.percentile(sample, [0.5, 99.9])
    if lo >= -50 or hi < 150:  # (noisy air below -1100 HU and metal above 5000 HU are real CTs too)
        raise InputImageError(
            f"{what} intensities ({lo:.0f} to {hi:.0f}) are not plausible Hounsfield units "
            "(expected air/fat below -100 HU and bone above +150 HU); is this an MR, or a CT "
            "stored without its rescale slope/intercept?")
    soft = float(np.mean((sample > -150) & (sample < 150)))
    if soft < 0.02:
        raise InputImageError(
            f"{what} has almost no voxels of soft tissue near 0 HU ({soft:.1%} between -150 and +150 HU); is its "
            "rescale intercept applied twice (every value 1024 HU too low) or missing?")


def write_image(img: sitk.Image, path: str | os.PathLike, *, compress: bool = True, level: int = -1) -> Path:
    """Write an image atomically (temporary file, then rename); ``level`` 1 compresses fastest."""
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), compress, level)
    return path
