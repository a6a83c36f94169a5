"""Logic of the CTSMA module: bone segmentation, subchondral ROIs, microstructure inference,
report export and training, each a ``ctsma`` subcommand run in a background process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ctsma import PARAMETER_FILE_NAMES, PARAMETER_UNITS

from . import cli_args
from .logic_base import CliLogic, Run
from .parameters import AnalysisParameters
from .process import DONE, FAILED
from .scene_utils import remove_with_display, rollback_on_error, tagged_nodes
from .training_logic import TrainingMixin
from .volumes import dicom_slice_thickness

FOLDER = "CT-SMA results"
SOURCE_ROLE = "CTSMA.SourceVolume"  # node reference from a segmentation or result this module made to the CT it was made from
RESULT_ATTRIBUTE = "CTSMA.Result"  # on each map and table an analysis loaded: its role ("Tb.Th", "Tb.Th uncertainty", "table")
DEMO_NOTE = "Demonstration model, trained on the digital phantom: not for clinical use."


SUBJECT_FILE = "subject.txt"  # in an analysis's work folder: the name of the CT volume it analysed


class CTSMALogic(TrainingMixin, CliLogic):
    """Runs the CT-SMA analysis of a knee CT and loads the results into the scene."""

    _analysisDirs: tuple = ()  # work folders of this logic's analyses still on disk (the last one: for the report)
    _failedDirs: tuple = ()  # work folders of failed runs, kept with their log until the module closes
    _keepAnalysisDirs: bool = False  # the last analysis ran with keepWorkDir

    # -- inputs ----------------------------------------------------------------------------
    def _checkCt(self, ctVolume):
        from ctsma.errors import InputImageError

        if ctVolume is None:
            raise InputImageError("select a CT volume first")
        if not (hasattr(ctVolume, "IsA") and ctVolume.IsA("vtkMRMLScalarVolumeNode")):
            name = ctVolume.GetName() if hasattr(ctVolume, "GetName") else str(ctVolume)
            raise InputImageError(f"'{name}' is not a volume: select the CT volume")
        self.checkInScene(ctVolume)
        if ctVolume.GetImageData() is None:
            raise InputImageError(f"volume '{ctVolume.GetName()}' has no image data")
        if ctVolume.GetAttribute("CTSMA.Parameter"):  # a map or uncertainty map of an earlier analysis
            raise InputImageError(f"'{ctVolume.GetName()}' is a CT-SMA parameter map, not a CT: select the CT volume")

    def _exportCt(self, ctVolume, work: Path) -> Path:
        return self.exportVolume(ctVolume, work / "ct.nii")  # checked (_checkCt) before its work folder was made

    @staticmethod
    def madeFromAnother(segmentation, ctVolume):
        """The CT that this module made ``segmentation`` from, when that is not ``ctVolume`` (else None)."""
        source = segmentation.GetNodeReference(SOURCE_ROLE) if segmentation is not None else None
        if source is None or ctVolume is None or source.GetID() == ctVolume.GetID():
            return None
        return source

    def _checkSource(self, segmentation, ctVolume, what: str) -> None:
        """Refuse a segmentation this module made from another CT (e.g. the baseline scan's ROIs still selected
        for the follow-up): its labels would be resampled onto this CT and analysed as if they were its own."""
        from ctsma.errors import InputImageError

        source = self.madeFromAnother(segmentation, ctVolume)
        if source is not None:
            raise InputImageError(f"the {what} '{segmentation.GetName()}' was made from '{source.GetName()}', not "
                                  f"from the selected CT '{ctVolume.GetName()}': make this CT's {what} or select them")

    # -- bone segmentation ---------------------------------------------------------------
    def startBoneSegmentation(self, ctVolume, params: AnalysisParameters | None = None) -> Run:
        params = params or AnalysisParameters()
        self._checkCt(ctVolume)
        with self.preparing("segment") as work:
            ct = self._exportCt(ctVolume, work)
            out = work / "out"
            args = cli_args.segment_bones(ct, out, side=params.side)
            name = ctVolume.GetName()
            return self.startCli("bone segmentation", args, work, out, env=params.env(), inputs=[ctVolume],
                                 loader=lambda run: self.loadLabelOutput(run.out_dir / "bones.nii.gz", "bones",
                                                                         f"{name} bones", under=ctVolume))

    # -- subchondral ROIs ----------------------------------------------------------------
    def startRoiCreation(self, ctVolume, boneSegmentation, params: AnalysisParameters | None = None) -> Run:
        from ctsma.errors import InputImageError

        params = params or AnalysisParameters()
        if boneSegmentation is None:
            raise InputImageError("segment the bones first (or select a bone segmentation)")
        self._checkCt(ctVolume)
        self._checkSource(boneSegmentation, ctVolume, "bone segmentation")
        with self.preparing("rois") as work:
            ct = self._exportCt(ctVolume, work)
            bones = self.exportSegmentation(boneSegmentation, work / "bones.nii", ctVolume, kind="bones")
            out = work / "out"
            name = ctVolume.GetName()
            return self.startCli("ROI creation", cli_args.create_rois(ct, bones, out, side=params.side), work, out,
                                 env=params.env(), inputs=[ctVolume, boneSegmentation],
                                 loader=lambda run: self.loadLabelOutput(run.out_dir / "rois.nii.gz", "rois",
                                                                         f"{name} subchondral ROIs", under=ctVolume))

    # -- analysis ------------------------------------------------------------------------
    def startAnalysis(self, ctVolume, params: AnalysisParameters | None = None, boneSegmentation=None,
                      roiSegmentation=None) -> Run:
        from ctsma.errors import ModelFileError

        params = params or AnalysisParameters()
        if params.modelPath and not Path(params.modelPath).exists():
            raise ModelFileError(f"model file not found: {params.modelPath}")
        self._checkCt(ctVolume)
        self._checkSource(boneSegmentation, ctVolume, "bone segmentation")
        self._checkSource(roiSegmentation, ctVolume, "ROI segmentation")
        with self.preparing("infer") as work:
            ct = self._exportCt(ctVolume, work)
            bones = (self.exportSegmentation(boneSegmentation, work / "bones.nii", ctVolume, kind="bones")
                     if boneSegmentation is not None else None)
            rois = (self.exportSegmentation(roiSegmentation, work / "rois.nii", ctVolume, kind="rois")
                    if roiSegmentation is not None else None)
            out = work / "out"
            args = cli_args.infer(ct, out, model=params.modelPath, device=params.device, bones=bones, rois=rois,
                                  side=params.side, match_sharpness=params.matchSharpness,
                                  slice_thickness=dicom_slice_thickness(ctVolume), subject=ctVolume.GetName())
            name = ctVolume.GetName()
            (work / SUBJECT_FILE).write_text(name, encoding="utf-8")  # whose CT this is, for the report
            inputs = [n for n in (ctVolume, boneSegmentation, roiSegmentation) if n is not None]
            given = tuple(k for k, n in (("bones", boneSegmentation), ("rois", roiSegmentation)) if n is not None)
            run = self.startCli("analysis", args, work, out, env=params.env(), inputs=inputs,
                                loader=lambda run: self._analysisLoaded(run, name, ctVolume, given, params))
            run.info["ct"] = ctVolume  # the CT analysed, whatever the selector shows when the run ends
            return run

    def _analysisLoaded(self, run: Run, name: str, ctVolume, given: tuple, params: AnalysisParameters) -> dict:
        """Load a finished analysis; only then remove the earlier analyses' folders (each a copy of its CT, kept
        until now for the report of the results still shown), unless work folders are kept."""
        outputs = self.loadAnalysisOutputs(run.out_dir, name, under=ctVolume, given=given)
        self.removeEarlierResults(ctVolume, keep=outputs.values())
        self._keepAnalysisDirs = params.keepWorkDir
        self.removeAnalysisFolders()  # the earlier ones
        self._analysisDirs = (*self._analysisDirs, run.work_dir)
        return outputs

    def removeEarlierResults(self, ctVolume, keep=()) -> list[str]:
        """Remove the maps and tables of earlier analyses of ``ctVolume`` (all but ``keep``), so that a new analysis
        of the same CT replaces them instead of leaving two sets of nodes of the same names, some of them (a
        diagnosis or notes table the new analysis did not make) no longer true. Segmentations stay: they may have
        been edited, and the new analysis may have read them. Returns the names removed."""
        if ctVolume is None:
            return []
        kept = {n.GetID() for n in keep if n is not None}
        earlier = [node for node in tagged_nodes(self.scene, RESULT_ATTRIBUTE, {SOURCE_ROLE: ctVolume.GetID()})
                   if node.GetID() not in kept]
        names = [node.GetName() for node in earlier]
        remove_with_display(self.scene, earlier)
        return names

    def releaseRun(self) -> None:
        """After the module has shown how a run ended: forget it and deal with its work folder. A successful
        analysis keeps its folder (with its copy of the CT, for the report) until a later analysis succeeds or the
        module closes; a failed run keeps its folder, with the log, until the module closes; any other folder (a
        cancelled analysis's, a finished segmentation's or report export's) is removed at once. A training stays
        the current run (its progress and model file are read from it)."""
        run = self.run
        if run is None or self.isRunning() or run.label == "training":
            return
        state = run.status.state if run.status is not None else None
        if state == DONE and run.label == "analysis":
            self.run = None  # its folder is in _analysisDirs
            return
        if state == FAILED:
            self._failedDirs = (*self._failedDirs, run.work_dir)
        self.cleanupRun(keep_outputs=state == FAILED)

    def removeAnalysisFolders(self) -> None:
        """Delete the analyses' work folders, each holding a copy of a patient's CT (when the module closes, so
        that none is left in the temporary folder), unless the last analysis asked to keep them; failed runs'
        folders (kept for their log) go too."""
        for folder in self._failedDirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._failedDirs = ()
        if not self._keepAnalysisDirs:
            for folder in self._analysisDirs:
                shutil.rmtree(folder, ignore_errors=True)
            self._analysisDirs = ()

    def showResults(self, run, opacity: float = 0.6) -> int:
        """The CT that ``run`` analysed under its Tb.Th map in every slice view (whatever CT the selector shows
        now: another may have been chosen while the analysis ran); returns how many views were set."""
        from .views import show_fade

        ct = run.info.get("ct")
        if ct is None or not self._inScene(ct):
            return 0
        return show_fade(self.scene, ct, run.outputs.get("Tb.Th"), opacity)

    def loadLabelOutput(self, path: Path, kind: str, name: str, under=None) -> dict:
        """A bone ("bones") or ROI ("rois") label image as a named segmentation, in the results
        folder under the study of ``under`` (the CT) in the subject hierarchy. An earlier segmentation of that name
        stays (it may have been edited, or read by an analysis) and this one gets a name of its own (``CT bones_1``),
        so that the selectors never show two of one name."""
        import SimpleITK as sitk

        from . import scene_bridge as sb

        if not Path(path).exists():
            raise FileNotFoundError(f"the run finished without {Path(path).name}")
        names = sb.BONE_NAMES if kind == "bones" else sb.ROI_NAMES
        with rollback_on_error(self.scene):
            node = sb.labelmap_to_segmentation_node(sitk.ReadImage(str(path)), self.scene, names=names,
                                                    name=self.scene.GenerateUniqueName(name))
            if under is not None:
                node.SetNodeReferenceID(SOURCE_ROLE, under.GetID())
            sb.put_in_folder(self.scene, [node], FOLDER, under=under)
        return {kind: node}

    def loadAnalysisOutputs(self, out_dir: Path, name: str = "CT", under=None, given: tuple = ()) -> dict:
        """Maps, ROI/bone segmentations and the ROI table of ``ctsma infer`` into the scene.

        Returns ``{role: node}``: one role per parameter map present (``BV/TV`` ...), ``bones`` and ``rois``
        unless ``given`` names them (the segmentations the user gave are not loaded again), ``table``, when the
        summary has a diagnosis ``diagnosis``, and when it has warnings, a demonstration model or a CT matched to
        the model's training CTs ``notes`` (the patient report's *Analysis notes*, the demonstration notice first)."""
        import SimpleITK as sitk

        from . import scene_bridge as sb
        from .colors import recorded_range, show_parameter_map

        out_dir = Path(out_dir)
        table = out_dir / "roi_table.csv"
        if not table.exists():
            raise FileNotFoundError(f"the analysis finished without roi_table.csv in {out_dir}")
        import pandas as pd

        summary = out_dir / "summary.json"
        data = json.loads(summary.read_text(encoding="utf-8")) if summary.exists() else None

        out = {}
        with rollback_on_error(self.scene):
            for param, stem in PARAMETER_FILE_NAMES.items():
                path = out_dir / "maps" / f"{stem}.nii.gz"
                if path.exists():
                    node = sb.sitk_to_volume_node(sitk.ReadImage(str(path)), self.scene, name=f"{name} {param}")
                    node.SetAttribute("CTSMA.Parameter", param)
                    node.SetAttribute("CTSMA.Unit", PARAMETER_UNITS.get(param, ""))
                    show_parameter_map(node, param, value_range=recorded_range(data, param))
                    out[param] = node
                upath = out_dir / "uncertainty" / f"{stem}.nii.gz"
                if upath.exists():
                    unode = sb.sitk_to_volume_node(sitk.ReadImage(str(upath)), self.scene,
                                                   name=f"{name} {param} uncertainty")
                    unode.SetAttribute("CTSMA.Parameter", param)
                    unode.SetAttribute("CTSMA.Unit", PARAMETER_UNITS.get(param, ""))  # a standard deviation
                    show_parameter_map(unode, param, uncertainty=True, value_range=recorded_range(data, param))
                    out[f"{param} uncertainty"] = unode
            for kind in ("bones", "rois"):
                path = out_dir / f"{kind}.nii.gz"
                if path.exists() and kind not in given:  # the user's own segmentation stays the one in use
                    label = {"bones": "bones", "rois": "subchondral ROIs"}[kind]  # as Segment bones / Create ROIs
                    out.update(self.loadLabelOutput(path, kind, f"{name} {label}", under=under))
            df = pd.read_csv(table)
            if "parameter" in df.columns:  # long format: the unit differs per row
                df["unit"] = [PARAMETER_UNITS.get(p, "") for p in df["parameter"]]
            out["table"] = sb.table_to_node(df, self.scene, name=f"{name} ROI table")
            if isinstance(data, dict):
                diag = {k: data[k] for k in ("oa_probability", "severity", "auc") if data.get(k) is not None}
                if diag:
                    out["diagnosis"] = sb.table_to_node([diag], self.scene, name=f"{name} diagnosis")
                from ctsma.report.patient import analysis_notes  # the report's sentences: warnings, CT matching

                demo = bool((data.get("model") or {}).get("demo"))  # the shipped or another phantom-trained model
                notes = [DEMO_NOTE] * demo + analysis_notes(data)
                if notes:
                    out["notes"] = sb.table_to_node(pd.DataFrame({"note": notes}), self.scene,
                                                    name=f"{name} analysis notes")
            for role, node in out.items():
                if role not in ("bones", "rois"):
                    node.SetAttribute(RESULT_ATTRIBUTE, role)  # a later analysis of this CT replaces it
                    if under is not None:
                        node.SetNodeReferenceID(SOURCE_ROLE, under.GetID())
            sb.put_in_folder(self.scene, out.values(), FOLDER, under=under)
        return out

    @staticmethod
    def notesText(outputs: dict) -> str:
        """For the status line after an analysis: the demonstration-model notice where it applies, and how many
        notes it left (warnings, CT matching), or nothing."""
        node = outputs.get("notes")
        n = 0 if node is None else node.GetNumberOfRows()
        if not n:
            return ""
        demo = f" {DEMO_NOTE}" if node.GetCellText(0, 0) == DEMO_NOTE else ""
        return f"{demo} {n} analysis note{'s' * (n != 1)}: see the table '{node.GetName()}'."

    # -- report ---------------------------------------------------------------
    def startReportExport(self, resultDir: Path, outDir: Path, subject="") -> Run:
        """PDF and HTML report of an analysis: ``outDir/report/patient_<subject>.pdf`` and ``.html``. ``subject``:
        the selected CT volume node or its name ("" or None: the name of the CT that was analysed)."""
        from ctsma.errors import UserError

        if subject is not None and not isinstance(subject, str):
            subject = subject.GetName()
        subject = subject or ""

        resultDir = Path(resultDir) if resultDir else None
        if resultDir is None or not (resultDir / "summary.json").exists():
            raise UserError("run the analysis first: there is no result to report")
        ct = resultDir.parent / "ct.nii"  # the CT exported for that analysis
        if not ct.exists():
            raise UserError(f"the analysed CT is gone from {resultDir.parent}: run the analysis again")
        recorded = resultDir.parent / SUBJECT_FILE
        analysed = recorded.read_text(encoding="utf-8") if recorded.exists() else ""
        if subject and analysed and subject != analysed:
            raise UserError(f"the last analysis was of '{analysed}', not of the selected '{subject}': run the "
                            f"analysis of '{subject}' first, or select '{analysed}'")
        with self.preparing("report") as work:
            args = cli_args.report(ct, resultDir, Path(outDir), subject=subject or analysed)
            return self.startCli("report export", args, work, Path(outDir) / "report", loader=None)

    def lastResultDir(self) -> Path | None:
        """The output folder of the last successful analysis (for the report export)."""
        run = self.run
        if run is not None and run.label == "analysis" and run.status is not None and run.status.state == "done":
            return run.out_dir
        return None
