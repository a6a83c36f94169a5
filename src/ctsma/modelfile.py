"""Self-describing, safe model files (safetensors + JSON metadata + checksum).

Every trained model of the project (synthesis, teacher, student, diagnosis aggregator) is one
``.safetensors`` file: the weights as plain tensors, and in the header a JSON document with the
model ``kind``, the architecture settings, normalisation, parameter names and units, training
summary, code version and metrics. Loading never unpickles anything (safetensors holds raw
tensor bytes only), and a SHA-256 over the tensor bytes, recorded in the metadata, rejects a file
whose weights were altered after it was written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import __version__
from .errors import ModelFileError
from .io.atomic import atomic_path, to_jsonable

FORMAT = "ctsma-model"
FORMAT_VERSION = 1


def _digest(tensors: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = tensors[name]
        arr = arr.detach().cpu().contiguous().numpy() if hasattr(arr, "detach") else np.ascontiguousarray(arr)
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(tuple(arr.shape)).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_model(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any], *, kind: str) -> Path:
    """Write ``tensors`` (name → torch tensor) and ``metadata`` atomically to ``path``."""
    from safetensors.torch import save_file

    import torch

    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).detach().cpu().contiguous()
               for k, v in tensors.items()}
    meta = dict(to_jsonable(dict(metadata)))
    meta.update({"kind": kind, "ctsma_version": __version__})
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind,
              "sha256": _digest(tensors), "metadata": json.dumps(meta, allow_nan=False)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_metadata(path: str | Path) -> dict:
    """Only the JSON metadata of a model file (cheap: reads the header)."""
    return _open(path)[1]


def load_model(path: str | Path, *, kind: str | None = None) -> tuple[dict, dict]:
    """Load ``(tensors, metadata)``, refusing wrong kinds, unknown format versions and altered weights."""
    from safetensors.torch import load_file

    path, meta = _open(path, kind=kind)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on corrupt payloads
        raise ModelFileError(f"model file {path.name} is damaged: {exc}") from None
    if _digest(tensors) != meta["_sha256"]:
        raise ModelFileError(f"model file {path.name} failed its checksum: the weights were altered or damaged")
    return tensors, meta


def _files_in(folder: Path, kind: str | None, safe_open) -> str:
    """What to say about a folder given as a model file: its model files of the kind needed."""
    found = []
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                header = fh.metadata() or {}
        except Exception:
            continue
        if header.get("format") == FORMAT and (kind is None or header.get("kind") == kind):
            found.append(str(f))
    what = f"'{kind}' model file" if kind else "model file"
    if not found:
        return f"it holds no {what}"
    return f"give one of its {what}s: {', '.join(found[:6])}" + (" …" if len(found) > 6 else "")


def _open(path: str | Path, kind: str | None = None) -> tuple[Path, dict]:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():  # e.g. a training run folder, which 'ctsma evaluate --models' takes: name its model files
        raise ModelFileError(f"{path} is a folder, not a model file: "
                             + _files_in(path, kind, safe_open))
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except Exception as exc:
        raise ModelFileError(f"{path.name} is not a CT-SMA model file (unreadable safetensors header: {exc})") from None
    if header.get("format") != FORMAT:
        raise ModelFileError(f"{path.name} is not a CT-SMA model file (no '{FORMAT}' header)")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise ModelFileError(f"{path.name} has model-file format version {header.get('format_version')}; "
                             f"this CT-SMA reads version {FORMAT_VERSION}")
    if kind is not None and header.get("kind") != kind:
        raise ModelFileError(f"{path.name} is a '{header.get('kind')}' model; a '{kind}' model is needed here")
    try:
        meta = json.loads(header["metadata"])
    except (KeyError, json.JSONDecodeError):
        raise ModelFileError(f"{path.name} has damaged metadata") from None
    meta["_sha256"] = header.get("sha256", "")
    return path, meta
