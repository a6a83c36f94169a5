"""The Slicer modules without the Slicer application: UI/code agreement, layout, headless Logic.

Qt cannot run here, so the widget layer is checked statically (``CTSMALib.ui_check``), and the
checker itself is shown to catch the mistakes it is for. The extension's CMake files are
configured, built and installed against a stand-in Slicer package when ``cmake`` is present.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from CTSMALib import cli_args, ui_check

REPO = Path(__file__).resolve().parent.parent
MODULES = {
    "CTSMA": (REPO / "CTSMA" / "CTSMA.py", REPO / "CTSMA" / "Resources" / "UI" / "CTSMA.ui"),
    "CTSMARegistration": (REPO / "CTSMARegistration" / "CTSMARegistration.py",
                          REPO / "CTSMARegistration" / "Resources" / "UI" / "CTSMARegistration.ui"),
}


# -- the UI and the code agree ---------------------------------------------------------------------
@pytest.mark.parametrize("module", sorted(MODULES))
def test_widget_names_used_by_the_code_exist_in_the_ui_file(module):
    py, ui = MODULES[module]
    assert ui_check.check_module(py, ui) == []
    used = ui_check.used_ui_names(py.read_text())
    assert {"progressBar", "stageLabel"} <= set(used)  # the checker really sees the widget code
    assert set(used) <= set(ui_check.declared_ui_widgets(py.read_text()))


def _remove_widget(ui: Path, name: str, out: Path) -> Path:
    tree = ET.parse(ui)
    for parent in tree.getroot().iter():
        for item in list(parent):
            target = item if item.tag == "widget" else item.find("widget")
            if target is not None and target.get("name") == name:
                parent.remove(item)
                tree.write(out, xml_declaration=True, encoding="UTF-8")
                return out
    raise AssertionError(f"{name} not found")


@pytest.mark.parametrize("module,widget", [("CTSMARegistration", "applyButton"), ("CTSMA", "deviceComboBox"),
                                           ("CTSMA", "trainingOutputDirButton")])
def test_checker_fails_when_a_widget_is_removed(tmp_path, module, widget):
    py, ui = MODULES[module]
    broken = _remove_widget(ui, widget, tmp_path / ui.name)
    problems = ui_check.check_module(py, broken)
    assert any(f"'{widget}'" in p and "missing" in p for p in problems), problems
    assert ui_check.main([str(py), str(broken)]) == 1


def test_checker_fails_on_wrong_class_unknown_parameter_and_undeclared_use(tmp_path):
    py, ui = MODULES["CTSMA"]
    text = ui.read_text()
    # a widget of another class than the code expects
    swapped = tmp_path / "class.ui"
    swapped.write_text(text.replace('class="QComboBox" name="deviceComboBox"', 'class="QLineEdit" name="deviceComboBox"'))
    assert any("deviceComboBox' is a QLineEdit" in p for p in ui_check.check_module(py, swapped))
    # a binding to a parameter the parameter node does not have
    renamed = tmp_path / "param.ui"
    renamed.write_text(text.replace("<string>modelPath</string>", "<string>modelFile</string>"))
    assert any("'modelFile'" in p for p in ui_check.check_module(py, renamed))
    # code using a widget that is not declared, and a combo bound to str without Choice
    source = py.read_text()
    code = tmp_path / "CTSMA.py"
    code.write_text(source.replace("self.ui.runButton.enabled = hasCt", "self.ui.runButon.enabled = hasCt")
                    .replace('device: Annotated[str, Choice(list(DEVICES))] = "auto"', 'device: str = "auto"'))
    problems = ui_check.check_module(code, ui)
    assert any("self.ui.runButon" in p for p in problems)
    assert any("needs a Choice annotation" in p for p in problems)
    # a path parameter shown in a plain line edit cannot be connected by Slicer
    lineedit = tmp_path / "path.ui"
    lineedit.write_text(text.replace('class="ctkPathLineEdit" name="modelPathLineEdit"',
                                     'class="QLineEdit" name="modelPathLineEdit"'))
    assert any("cannot represent parameter 'modelPath'" in p for p in ui_check.check_module(py, lineedit))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_file_is_thin_and_takes_its_logic_from_the_lib(module):
    py, ui = MODULES[module]
    tree = ast.parse(py.read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {module, f"{module}Widget", f"{module}Test", f"{module}ParameterNode"} <= classes
    assert f"{module}Logic" not in classes  # defined in CTSMALib, headless-testable
    imported = {(n.module, a.name) for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert any(mod and mod.startswith("CTSMALib.") and name == f"{module}Logic" for mod, name in imported)
    assert len(py.read_text().splitlines()) < 300
    src = py.read_text()
    assert "slicer.util.tryWithErrorDisplay" in src and "RunMonitor" in src
    root = ET.parse(ui).getroot()
    advanced = [w for w in root.iter("widget") if w.get("class") == "ctkCollapsibleButton"
                and any(p.get("name") == "collapsed" for p in w.findall("property"))]
    assert advanced, "an Advanced/Training section collapsed by default"


def test_lib_imports_no_qt_at_import_time():
    code = ("import sys, importlib, pkgutil, CTSMALib\n"
            "for m in pkgutil.iter_modules(CTSMALib.__path__): importlib.import_module('CTSMALib.' + m.name)\n"
            "bad = [m for m in ('qt', 'ctk', 'PythonQt', 'slicer.ScriptedLoadableModule') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO / "CTSMA", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- packaging ------------------------------------------------------------------------------------
def test_requirements_match_pyproject_minus_what_slicer_provides():
    from CTSMALib.dependencies import PROVIDED_BY_SLICER, requirement_lines

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]

    def name(r):
        return re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower()

    expected = sorted(r for r in deps if name(r) not in PROVIDED_BY_SLICER)
    assert sorted(requirement_lines()) == expected


def _listed(cmake: Path, var: str) -> set[str]:
    text = cmake.read_text()
    body = re.search(rf"set\({var}\s+(.*?)\)", text, re.S).group(1)
    name = re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1)
    return {line.strip().replace("${MODULE_NAME}", name) for line in body.splitlines() if line.strip()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_cmake_lists_every_script_and_resource(module):
    folder = REPO / module
    scripts = {str(p.relative_to(folder)) for p in folder.rglob("*.py")
               if "Testing" not in p.parts and "__pycache__" not in p.parts}
    resources = {str(p.relative_to(folder)) for p in (folder / "Resources").rglob("*") if p.is_file()}
    assert _listed(folder / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS") == scripts
    assert _listed(folder / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES") == resources
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in (folder / "CMakeLists.txt").read_text()


_FAKE_SLICER = {
    "SlicerConfig.cmake": """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
""",
    "Empty.cmake": "",
    "UseSlicer.cmake": """
# Like Slicer's macro: copy SCRIPTS and RESOURCES into the scripted-modules folder, install it.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  set(_outputs)
  foreach(f ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule(${MY_NAME}): missing ${f}")
    endif()
    set(_dst ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${f})
    add_custom_command(OUTPUT ${_dst} COMMAND ${CMAKE_COMMAND} -E copy ${CMAKE_CURRENT_SOURCE_DIR}/${f} ${_dst}
                       DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
    list(APPEND _outputs ${_dst})
  endforeach()
  add_custom_target(${MY_NAME} ALL DEPENDS ${_outputs})
  install(DIRECTORY ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/
          DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} PATTERN "ctsma" EXCLUDE)
endmacro()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT})
    message(FATAL_ERROR "missing test script ${MY_SCRIPT}")
  endif()
endfunction()
""",
}


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_extension_builds_and_installs_with_the_core_package(tmp_path):
    """Configure/build/install against a stand-in Slicer: modules, CTSMALib, ctsma and its
    resources land in one scripted-modules folder, and the installed copy runs headless."""
    fake = tmp_path / "slicer"
    fake.mkdir()
    for name, text in _FAKE_SLICER.items():
        (fake / name).write_text(text)
    build, prefix = tmp_path / "build", tmp_path / "install"

    def run(*cmd):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run("cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=ON",
        f"-DCMAKE_INSTALL_PREFIX={prefix}")
    run("cmake", "--build", str(build))
    run("cmake", "--install", str(build))
    lib = prefix / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for rel in ["CTSMA.py", "CTSMARegistration.py", "CTSMALib/process.py", "Resources/UI/CTSMA.ui",
                "Resources/UI/CTSMARegistration.ui", "Resources/Icons/CTSMA.png", "Resources/requirements.txt",
                "ctsma/__init__.py", "ctsma/cli/main.py", "ctsma/resources/Icons/CTSMA.png"]:
        assert (lib / rel).is_file(), rel
    assert not (lib / "ctsma" / "resources").is_symlink()
    # the installed ctsma (not the development one) answers, with its resources
    code = ("import ctsma, ctsma.resources as r, sys; "
            "assert ctsma.__file__.startswith(sys.argv[1]); print(r.resource_path('Icons', 'CTSMA.png'))")
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(lib)!r}); " + code,
                           str(lib)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(lib))


# -- the command lines the modules run --------------------------------------------------------------
def _registered() -> list[str]:
    from ctsma.cli.main import SUBCOMMANDS

    return SUBCOMMANDS


_BUILT = {
    "register": cli_args.register(Path("mr.nii"), Path("ct.nii"), Path("out"), preset="fast",
                                  ct_bones=Path("b.nii"), threads=2,
                                  extra=["--model", "synth.safetensors"]),
    "segment (bones)": cli_args.segment_bones(Path("ct.nii"), Path("out")),
    "segment (bones of the left knee)": cli_args.segment_bones(Path("ct.nii"), Path("out"), side="L"),
    "segment (rois)": cli_args.create_rois(Path("ct.nii"), Path("bones.nii"), Path("out"), side="L"),
    "infer": cli_args.infer(Path("ct.nii"), Path("out"), model="m.safetensors", device="cpu",
                            bones=Path("b.nii"), rois=Path("r.nii"), side="R"),
    "infer (as it is)": cli_args.infer(Path("ct.nii"), Path("out"), match_sharpness=False),
    "infer (DICOM thickness)": cli_args.infer(Path("ct.nii"), Path("out"), slice_thickness=1.25),
    "infer (volume name)": cli_args.infer(Path("ct.nii"), Path("out"), subject="-Knee CT 2"),
    "report": cli_args.report(Path("ct.nii"), Path("res"), Path("out"), subject="knee 1"),
    "train": cli_args.train("student", Path("c.yaml"), Path("out")),
    "train (store)": cli_args.train("baseline", Path("c.yaml"), Path("out"), store=Path("store")),
    "dataset": cli_args.dataset_build(Path("cohort/manifest.csv"), Path("out/store")),
}


@pytest.mark.parametrize("label", sorted(_BUILT))
def test_module_command_lines_parse_with_the_real_cli(label):
    args = _BUILT[label]
    # every command the modules run is registered: a renamed or dropped subcommand fails here, not skips
    assert args[0] in _registered(), f"the module runs 'ctsma {args[0]}', which the command line does not have"
    from ctsma.cli.main import build_parser

    parsed = build_parser().parse_args(["--progress-jsonl", "p.jsonl", *args])
    assert parsed.command == args[0] and getattr(parsed, "func", None) is not None
    if args[0] == "infer":  # the module's "Match a sharper CT" box reaches infer's setting
        assert parsed.harmonise is (label != "infer (as it is)")
        assert parsed.slice_thickness == (1.25 if label == "infer (DICOM thickness)" else None)


# -- Logic headless --------------------------------------------------------------------------------
@pytest.mark.mrml
def test_logics_run_headless_with_singleton_parameter_nodes(mrml_scene):
    from CTSMALib.analysis_logic import CTSMALogic
    from CTSMALib.registration_logic import CTSMARegistrationLogic

    for logic, name in ((CTSMALogic(), "CTSMA"), (CTSMARegistrationLogic(), "CTSMARegistration")):
        node = logic.getParameterNode()
        assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == name
        assert logic.getParameterNode() is node  # singleton
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 2


def test_presets_come_from_json_files_and_may_be_absent(tmp_path):
    from CTSMALib.registration_logic import CTSMARegistrationLogic, preset_names

    assert preset_names(tmp_path / "missing") == []
    (tmp_path / "fast.json").write_text(json.dumps({"stages": ["rigid"]}))
    (tmp_path / "accurate.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("not a preset")
    assert preset_names(tmp_path) == ["accurate", "fast"]
    assert {"default", "demo", "nosynth"} <= set(CTSMARegistrationLogic().presetNames())  # the shipped presets


def test_parameters_validate_and_build_the_environment():
    from ctsma.errors import ConfigError

    from CTSMALib.parameters import AnalysisParameters, RegistrationParameters

    with pytest.raises(ConfigError, match="device"):
        AnalysisParameters(device="gpu")
    with pytest.raises(ConfigError, match="side"):
        AnalysisParameters(side="left")
    with pytest.raises(ValueError):
        cli_args.train("teachers", Path("c.yaml"), Path("out"))
    p = RegistrationParameters(threads=2, extraArgs="--seed 3 --name 'a b'")
    assert p.extra() == ["--seed", "3", "--name", "a b"]
    assert p.env()["OMP_NUM_THREADS"] == "2" and RegistrationParameters().env() == {}
