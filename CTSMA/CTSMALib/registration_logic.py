"""Logic of the CTSMARegistration module: MR -> CT registration in a background process."""

from __future__ import annotations

import json
from pathlib import Path

from . import cli_args
from .logic_base import CliLogic, Run
from .parameters import RegistrationParameters
from .scene_utils import remove_with_display, rollback_on_error, tagged_nodes

PRESET_FOLDER = ("Presets", "registration")
OUTPUTS = {"transform": "transform_ct_to_mr.h5", "mr_in_ct": "mr_in_ct.nii.gz",
           "pseudo_ct": "pseudo_ct_in_ct.nii.gz", "qa": "qa.json"}
OPTIONAL = {"pseudo_ct"}  # presets without synthesis (e.g. nosynth) make no pseudo-CT
OUTPUT_ATTRIBUTE = "CTSMA.RegistrationOutput"  # on each node a registration loaded: its role (transform, qa, ...)
FIXED_ROLE, MOVING_ROLE = "CTSMA.FixedVolume", "CTSMA.MovingVolume"  # node references to the CT and the MR


def preset_names(folder: Path | None = None) -> list[str]:
    """Names of the JSON presets in ``Resources/Presets/registration`` (empty if none yet)."""
    if folder is None:
        from ctsma.resources import resource_path

        folder = resource_path(*PRESET_FOLDER, must_exist=False)
    folder = Path(folder)
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def qa_rows(qa: dict) -> list[dict]:
    """One table row per registration stage of ``qa.json`` (plus a total row)."""
    rows = []
    for i, stage in enumerate(qa.get("stages", []), 1):
        row = {"order": i}
        for key, value in stage.items():
            row[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        rows.append(row)
    total = qa.get("total_seconds", qa.get("seconds"))
    if total is not None:
        rows.append({"order": len(rows) + 1, "name": "total", "seconds": total})
    return rows


class CTSMARegistrationLogic(CliLogic):
    """Registers an MR volume to a CT volume with ``ctsma register`` and loads the results:
    the transform (CT -> MR, Slicer's FromParent direction), the MR and pseudo-CT resampled
    into CT space, and the QA table."""

    def presetNames(self) -> list[str]:
        return preset_names()

    def startRegistration(self, mrVolume, ctVolume, boneSegmentation=None,
                          params: RegistrationParameters | None = None) -> Run:
        from ctsma.errors import InputImageError

        params = params or RegistrationParameters()
        if mrVolume is None or ctVolume is None:
            raise InputImageError("select both an MR volume and a CT volume")
        if mrVolume is ctVolume:
            raise InputImageError("the MR and CT volumes must be different volumes")
        self.checkInScene(mrVolume, "MR volume")
        self.checkInScene(ctVolume, "CT volume")
        if params.preset and params.preset not in self.presetNames():
            raise InputImageError(f"unknown registration preset '{params.preset}'; "
                                  f"available: {', '.join(self.presetNames()) or 'none'}")
        earlier = self.earlierTransform(mrVolume, ctVolume)  # the MR shown in CT space by this pair's last run
        if earlier is None and not params.resampleMr and mrVolume.GetParentTransformNode() is not None:
            # the result is a transform for the MR as exported (its transforms applied); put above the MR's own
            # transform, it would move the MR by that transform a second time
            raise InputImageError(f"the MR '{mrVolume.GetName()}' is under a transform: harden it first (Data "
                                  "module: right-click, Harden transform), or load the MR resampled into the CT")
        extra = params.extra()  # before any work: a mistake there is the user's, not a failed run
        inputs = [n for n in (mrVolume, ctVolume, boneSegmentation) if n is not None]
        with self.preparing("register") as work:
            mr = self.exportVolume(mrVolume, work / "mr.nii", world=earlier is None)  # the MR as acquired
            ct = self.exportVolume(ctVolume, work / "ct.nii")
            bones = (self.exportSegmentation(boneSegmentation, work / "ct_bones.nii", ctVolume, kind="bones")
                     if boneSegmentation is not None else None)
            out = work / "out"
            args = cli_args.register(mr, ct, out, preset=params.preset, ct_bones=bones, threads=params.threads,
                                     extra=extra)
            names = {"mr": mrVolume.GetName(), "ct": ctVolume.GetName()}
            from ctsma.registration.qa import EXIT_QA_FAILED  # a pair that failed its QA: loaded to look at

            run = self.startCli("registration", args, work, out, env=params.env(), inputs=inputs,
                                loader=lambda run: self._registrationLoaded(run, names, ctVolume, mrVolume, params,
                                                                            earlier),
                                done_codes=(0, EXIT_QA_FAILED))
            run.info.update(ct=ctVolume, mr=mrVolume, resampleMr=params.resampleMr, keepWorkDir=params.keepWorkDir)
            return run

    def earlierTransform(self, mrVolume, ctVolume):
        """The transform an earlier registration of this MR to this CT placed the MR under, when the MR is still
        directly under it (and it under nothing): a new registration of the pair reads the MR without it and
        replaces it. None otherwise."""
        parent = mrVolume.GetParentTransformNode() if mrVolume is not None else None
        if (parent is None or parent.GetAttribute(OUTPUT_ATTRIBUTE) != "transform"
                or parent.GetParentTransformNode() is not None or ctVolume is None
                or parent.GetNodeReferenceID(FIXED_ROLE) != ctVolume.GetID()
                or parent.GetNodeReferenceID(MOVING_ROLE) != mrVolume.GetID()):
            return None
        return parent

    def _registrationLoaded(self, run: Run, names: dict, ctVolume, mrVolume, params: RegistrationParameters,
                            earlier) -> dict:
        """Load a finished registration; then the earlier outputs of the same MR and CT go, and an MR left under
        the earlier transform moves under the new one."""
        outputs = self.loadOutputs(run.out_dir, names, under=ctVolume, mrVolume=None if params.resampleMr else mrVolume,
                                   pair=(ctVolume, mrVolume))
        if earlier is not None and mrVolume.GetParentTransformNode() is earlier:
            mrVolume.SetAndObserveTransformNodeID(outputs["transform"].GetID())
        self.removeEarlierOutputs(ctVolume, mrVolume, keep=outputs.values())
        return outputs

    def removeEarlierOutputs(self, ctVolume, mrVolume, keep=()) -> list[str]:
        """Remove the outputs of earlier registrations of ``mrVolume`` to ``ctVolume`` (all but ``keep``), so that
        registering the pair again replaces them; a transform that some other node is still under stays. Returns
        the names removed."""
        kept = {n.GetID() for n in keep if n is not None}
        scene = self.scene
        earlier = [n for n in tagged_nodes(scene, OUTPUT_ATTRIBUTE, {FIXED_ROLE: ctVolume.GetID(),
                                                                     MOVING_ROLE: mrVolume.GetID()})
                   if n.GetID() not in kept]
        nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        used = {n.GetTransformNodeID() for n in nodes if n.IsA("vtkMRMLTransformableNode") and n.GetTransformNodeID()}
        earlier = [n for n in earlier if n.GetID() not in used]
        names = [n.GetName() for n in earlier]
        remove_with_display(scene, earlier)
        return names

    def loadOutputs(self, out_dir: Path, names: dict | None = None, under=None, mrVolume=None, pair=None) -> dict:
        """Put the registration outputs of ``out_dir`` into the scene; returns ``{role: node}``
        with the roles ``transform``, ``mr_in_ct``, ``qa`` and (when synthesis ran) ``pseudo_ct``.
        They go in a folder under the study of ``under`` (the CT) in the subject hierarchy.
        Given ``mrVolume``, no resampled copy is loaded: that MR is placed under the transform
        (shown in CT space by Slicer) and no ``mr_in_ct`` role is returned. ``pair`` (the CT and MR volume nodes):
        each output remembers them, so that a new registration of the pair replaces it."""
        import SimpleITK as sitk

        from . import scene_bridge as sb

        names = names or {"mr": "MR", "ct": "CT"}
        out_dir = Path(out_dir)
        missing = [f for k, f in OUTPUTS.items() if k not in OPTIONAL and not (out_dir / f).exists()]
        if missing:
            raise FileNotFoundError(f"the registration finished without {', '.join(missing)} in {out_dir}")
        qa = json.loads((out_dir / OUTPUTS["qa"]).read_text(encoding="utf-8"))
        out = {}
        with rollback_on_error(self.scene):  # all or nothing
            out["transform"] = sb.read_transform_file(out_dir / OUTPUTS["transform"], self.scene,
                                                      name=f"{names['ct']} to {names['mr']} transform")
            if mrVolume is None:
                out["mr_in_ct"] = sb.sitk_to_volume_node(sitk.ReadImage(str(out_dir / OUTPUTS["mr_in_ct"])),
                                                         self.scene, name=f"{names['mr']} in CT")
            if (out_dir / OUTPUTS["pseudo_ct"]).exists():
                out["pseudo_ct"] = sb.sitk_to_volume_node(sitk.ReadImage(str(out_dir / OUTPUTS["pseudo_ct"])),
                                                          self.scene, name=f"{names['mr']} pseudo-CT")
            out["qa"] = sb.table_to_node(qa_rows(qa), self.scene, name=f"{names['mr']} registration QA",
                                         units={"seconds": "s"})
            for role, node in out.items():
                node.SetAttribute(OUTPUT_ATTRIBUTE, role)
                if pair is not None:
                    node.SetNodeReferenceID(FIXED_ROLE, pair[0].GetID())
                    node.SetNodeReferenceID(MOVING_ROLE, pair[1].GetID())
            sb.put_in_folder(self.scene, out.values(), "CT-SMA registration", under=under)
        if mrVolume is not None:  # last, so that a failed load leaves the MR as it was
            mrVolume.SetAndObserveTransformNodeID(out["transform"].GetID())
        return out

    # -- checking the alignment ------------------------------------------------------------
    def showAlignment(self, ctVolume, mrInCtVolume, opacity: float = 0.5) -> int:
        """Fade view: CT in the background, MR in CT in the foreground at ``opacity``, in every
        slice view; returns how many views were set."""
        from .views import show_fade

        return show_fade(self.scene, ctVolume, mrInCtVolume, opacity)

    def showCheckerboard(self, ctVolume, mrInCtVolume, squareMm: float = 10.0):
        """A CT/MR checkerboard volume, shown in the slice views; returns its node."""
        from .views import checkerboard_volume

        return checkerboard_volume(self.scene, ctVolume, mrInCtVolume, squareMm)
