"""The "CT-SMA phantom knee" sample data: a CT + MR pair generated locally, once, then cached.

Nothing is downloaded: ``ctsma phantom --n 1`` runs in a background process (about a minute with
the ``demo`` preset) and writes one knee into the cache folder (machine setting ``cacheDir``).
The folder name holds the generator version, the preset, the seed and a hash of any setting
overrides, so a new generator or other settings make a new sample, and a half-generated sample
never counts (it is written under a temporary name and renamed into place when complete).

In Slicer, :func:`register_sample_data` adds the sample to the Sample Data module (category
"CT-SMA"); its button calls :func:`load_sample_in_slicer`. Scripts and tests call
:func:`ensure_sample_phantom` and :func:`load_sample`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

CATEGORY = "CT-SMA"
SAMPLE_NAME = "CT-SMA phantom knee"
SEED = 11
ROLES = ("ct", "mr", "ct_bones", "ct_rois", "mr_bones", "transform_ct_to_mr", "landmarks")


def sample_folder(cache_dir, preset: str = "demo", overrides: dict | None = None) -> Path:
    from ctsma.phantom.settings import GENERATOR_VERSION

    key = f"phantom-knee-{preset}-g{GENERATOR_VERSION}-s{SEED}"
    if overrides:
        key += "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / key


def cached_sample(folder) -> dict | None:
    """``{role: Path, "subject": str, "side": str}`` of a complete cached sample, else None."""
    manifest = Path(folder) / "manifest.csv"
    if not manifest.is_file():
        return None
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None
    row = rows[0]
    out = {"subject": row.get("subject", ""), "side": row.get("side", ""), "folder": Path(folder)}
    for role in ROLES:
        if not row.get(role):
            return None
        path = Path(folder) / row[role]
        if not path.is_file():
            return None
        out[role] = path
    return out


def ensure_sample_phantom(cache_dir, preset: str = "demo", overrides: dict | None = None,
                          runner_factory: Callable | None = None,
                          on_poll: Callable | None = None, interval: float = 0.2) -> dict:
    """The cached sample, generated first if needed with ``ctsma phantom --n 1`` in the background.

    ``on_poll(status)`` is called while it runs (the GUI updates its progress dialog there);
    returning ``False`` cancels. Raises ``RuntimeError`` if the generation fails or is cancelled.
    """
    from .logic_base import CliLogic
    from .process import DONE

    folder = sample_folder(cache_dir, preset, overrides)
    hit = cached_sample(folder)
    if hit is not None:
        return hit
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}-{int(time.time())}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        args = ["phantom", "--n", "1", "--seed", str(SEED), "--out", str(tmp / "knee"), "--preset", preset]
        if overrides:
            (tmp / "settings.json").write_text(json.dumps(overrides), encoding="utf-8")
            args += ["--config", str(tmp / "settings.json")]
        runner = (runner_factory or CliLogic._defaultRunner)()
        runner.start_ctsma(args, tmp)
        status = runner.poll()
        while not status.finished:
            if on_poll is not None and on_poll(status) is False:
                status = runner.cancel()
                break
            time.sleep(interval)
            status = runner.poll()
        if status.state != DONE:
            detail = status.last_error or status.state
            raise RuntimeError(f"generating the sample phantom knee did not finish: {detail}")
        if cached_sample(tmp / "knee") is None:
            raise RuntimeError("the phantom generator finished without the CT/MR files of the sample")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp / "knee", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cached_sample(folder)


def load_sample(paths: dict, scene) -> dict:
    """CT and MR volume nodes of a sample, under a patient/study in the subject hierarchy
    (so that the modules' results are grouped with them)."""
    import slicer
    import SimpleITK as sitk

    from . import scene_bridge as sb

    subject = paths.get("subject") or "phantom"
    ct = sb.sitk_to_volume_node(sitk.ReadImage(str(paths["ct"])), scene, f"Phantom knee {subject} CT")
    mr = sb.sitk_to_volume_node(sitk.ReadImage(str(paths["mr"])), scene, f"Phantom knee {subject} MR")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), f"CT-SMA phantom {subject}")
    study = sh.CreateStudyItem(patient, f"Phantom knee ({paths.get('side', '')})")
    for node in (ct, mr):
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, study)
        else:
            sh.CreateItem(study, node)
    return {"ct": ct, "mr": mr}


# -- Slicer application only -----------------------------------------------------------------------
def load_sample_in_slicer(source=None) -> dict:
    """Sample Data button: generate (once) with a progress dialog, then load CT and MR."""
    import slicer

    from .dependencies import ensureDependencies
    from .settings import MachineSettings, QSettingsStore

    settings = MachineSettings(QSettingsStore())
    ensureDependencies("CT-SMA", backend=settings.torchBackend)  # the phantom runs on ctsma's packages
    cache = settings.cacheDir
    dialog = slicer.util.createProgressDialog(labelText="Generating the CT-SMA phantom knee (once, about a "
                                              "minute)...", maximum=100, windowTitle=SAMPLE_NAME)

    def on_poll(status):
        if status.fraction is not None:
            dialog.setValue(int(100 * status.fraction))
        slicer.app.processEvents()
        return not dialog.wasCanceled

    try:
        paths = ensure_sample_phantom(cache, on_poll=on_poll)
    finally:
        dialog.close()
    nodes = load_sample(paths, slicer.mrmlScene)
    slicer.util.setSliceViewerLayers(background=nodes["ct"], foreground=nodes["mr"], foregroundOpacity=0.0,
                                     fit=True)
    return nodes


def register_sample_data(thumbnail: str | None = None) -> None:
    """Add "CT-SMA phantom knee" to the Sample Data module (call at ``startupCompleted()``, when the
    Sample Data module is loaded; a Slicer without it is left alone)."""
    try:
        import SampleData
    except ImportError:
        return
    if thumbnail is None:  # Resources/ sits beside CTSMALib/ in the source tree and when installed
        icon = Path(__file__).resolve().parent.parent / "Resources" / "Icons" / "CTSMA.png"
        thumbnail = str(icon) if icon.is_file() else None

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY, sampleName=SAMPLE_NAME, thumbnailFileName=thumbnail,
        # Generated locally: the URIs are placeholders, the custom downloader makes the files.
        uris=["ctsma-phantom:ct", "ctsma-phantom:mr"], fileNames=["ct.nii.gz", "mr.nii.gz"],
        nodeNames=["Phantom knee CT", "Phantom knee MR"], loadFileType=["VolumeFile", "VolumeFile"],
        customDownloader=load_sample_in_slicer)
