"""Static checks of the Slicer extension (no Slicer needed): every file the CMake lists exist and every
Python file of the module is listed (unlisted files are not packaged), the catalog entry fits the
ExtensionsIndex schema and the CMake metadata, the .ui parses, uses only declared custom widgets and
has every widget the module's code looks up, and the module keeps Qt out of its data logic."""
from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "SemiSegExtension"
UI = EXT / "Resources" / "UI" / "SemiSeg.ui"


def cmake_sets(text: str) -> dict[str, list[str]]:
    """``set(NAME a b c)`` blocks → {NAME: [a, b, c]} (comments stripped, quotes kept off)."""
    text = re.sub(r"#[^\n]*", "", text)
    out = {}
    for m in re.finditer(r"\bset\(\s*(\w+)\s+(.*?)\)", text, re.S):
        out[m.group(1)] = [t.strip('"') for t in re.findall(r'"[^"]*"|\S+', m.group(2))]
    return out


def test_module_cmake_lists_existing_files_and_every_library_file():
    text = (EXT / "CMakeLists.txt").read_text()
    sets = cmake_sets(text)
    name = sets["MODULE_NAME"][0]
    assert name == "SemiSeg"
    scripts = [s.replace("${MODULE_NAME}", name) for s in sets["MODULE_PYTHON_SCRIPTS"]]
    resources = [s.replace("${MODULE_NAME}", name) for s in sets["MODULE_PYTHON_RESOURCES"]]
    for rel in scripts + resources:
        assert (EXT / rel).is_file(), f"listed in SemiSegExtension/CMakeLists.txt but missing: {rel}"
    on_disk = sorted(p.relative_to(EXT).as_posix() for p in (EXT / "SemiSegSlicerLib").glob("*.py"))
    assert sorted(s for s in scripts if s.startswith("SemiSegSlicerLib/")) == on_disk  # nothing left unpackaged
    assert "SemiSeg.py" in scripts and {"Resources/UI/SemiSeg.ui", "Resources/Icons/SemiSeg.png"} <= set(resources)
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}.*WITH_GENERIC_TESTS", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    # no stray module-level .py beside SemiSeg.py (Slicer would take it for a module)
    assert sorted(p.name for p in EXT.glob("*.py")) == ["SemiSeg.py"]


def test_extension_cmake_metadata_packages_and_catalog_entry():
    text = (ROOT / "CMakeLists.txt").read_text()
    project = re.search(r"^\s*project\((\w+)", text, re.M).group(1)
    assert project == "SemiSeg" and (ROOT / f"{project}.json").is_file()  # the index's name check
    sets = cmake_sets(text)
    assert sets["EXTENSION_DEPENDS"] == ["PyTorch"]
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL"):
        assert sets.get(key) and sets[key][0], key
    for sub in re.findall(r"add_subdirectory\((\w+)\)", text):
        assert (ROOT / sub / "CMakeLists.txt").is_file(), sub
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    tail = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("#")][-2:]
    assert tail == ["include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    # the packaged engine and trainer: the glob roots exist and hold the packages the module imports
    roots = re.search(r"foreach\(\w+ ([\w ]+)\)", text).group(1).split()
    assert roots == ["SemiSegLib", "SemiSegTrainer"]
    assert (ROOT / "SemiSegLib/semiseg/__init__.py").is_file()
    assert (ROOT / "SemiSegTrainer/semiseg_trainer/__main__.py").is_file()
    assert "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/${_semiseg_package_root}" in text

    entry = json.loads((ROOT / "SemiSeg.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) and set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["build_dependencies"] == sets["EXTENSION_DEPENDS"]
    assert entry["category"] == sets["EXTENSION_CATEGORY"][0] and 1 <= entry["tier"] <= 5
    assert not project.startswith("Slicer") and entry["scm_url"].split("/")[-1].startswith("Slicer")
    assert (ROOT / "LICENSE").is_file()


# The Extensions Index's offline rules (Slicer/ExtensionsIndex scripts/check_description_files.py: the
# description file's schema, category, repository name and URL scheme; the top-level CMakeLists.txt's
# project name, icon and screenshot URLs; a license file) and its catalog-entry schema
# (Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json).
CATALOG_SCHEMA = {"required": {"$schema", "category", "scm_url"},
                  "types": {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                            "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int},
                  "enums": {"scm_type": {"git", "local"}, "tier": {1, 3, 5}}}
RAW_URL = "https://raw.githubusercontent.com/SemiSeg/SlicerSemiSeg/main/"


def test_extensions_index_rules_that_run_offline():
    description = ROOT / "SemiSeg.json"
    name = description.stem
    entry = json.loads(description.read_text())
    assert CATALOG_SCHEMA["required"] <= set(entry) and set(entry) <= set(CATALOG_SCHEMA["types"])
    for key, value in entry.items():
        assert isinstance(value, CATALOG_SCHEMA["types"][key]) and not (
            CATALOG_SCHEMA["types"][key] is int and isinstance(value, bool)), key
        assert key not in CATALOG_SCHEMA["enums"] or value in CATALOG_SCHEMA["enums"][key], key
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    assert entry["category"] in ("Segmentation", "Active Learning")  # in the index's accepted categories
    scm = entry["scm_url"]
    assert "://" in scm and scm.split("://")[0] in ("git", "https")
    assert "slicer" in Path(scm.split("://")[1]).stem.lower()  # the repository name contains "Slicer"

    cmake = (ROOT / "CMakeLists.txt").read_text()
    project = re.findall(r'project\s*\(\s*([^\s\)\n\r]+)', cmake, re.I | re.M)  # the index's own patterns
    assert project and project[0].strip("\"'") == name
    icons = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake, re.I | re.M)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake, re.I | re.M)
    assert icons and shots, "icon and screenshot URLs must be set (non-empty, one quoted line each)"
    urls = [icons[0].strip()] + shots[0].split()
    for url in urls:  # https images in this repository, at the path the raw URL names
        assert url.startswith(RAW_URL) and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), url
        image = ROOT / url[len(RAW_URL):]
        assert image.is_file(), f"{url} names {image.relative_to(ROOT)}, which is not in the repository"
        head = image.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff" or head[:4] == b"GIF8", url
    assert any((ROOT / n).is_file() for n in ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt",
                                             "COPYING", "COPYING.txt"))
    # the repository stays far under the index's 100 MB: every tracked file counted
    import subprocess
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    size = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (ROOT / f).is_file())
    assert size < 100 * 2**20, f"{size / 2**20:.1f} MB of tracked files"


def test_screenshot_is_a_real_picture():
    """The screenshot is a rendered figure (not a placeholder): a PNG of useful size with many colours."""
    import zlib
    data = (ROOT / "Screenshots" / "semiseg-phantom.png").read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 300
    assert len(data) > 20_000 and len(zlib.compress(data)) > 0.5 * len(data)  # incompressible: real image data


def test_icon_is_a_128_pixel_png():
    data = (EXT / "Resources/Icons/SemiSeg.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QCheckBox",
              "QTableWidget", "QProgressBar", "QPlainTextEdit", "QFrame", "QLineEdit", "QTextBrowser"}


def test_ui_parses_and_declares_every_custom_widget():
    tree = ET.parse(UI)
    root = tree.getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and root.findtext("class") == top.get("name") == "SemiSeg"
    widgets = list(root.iter("widget"))
    names = [w.get("name") for w in widgets]
    assert len(names) == len(set(names)), "duplicate widget names"
    declared = {c.findtext("class"): c for c in root.iter("customwidget")}
    for cls, c in declared.items():
        assert c.findtext("header") == f"{cls}.h"
        assert c.findtext("extends") in QT_CLASSES | set(declared), f"{cls} extends an undeclared class"
    for w in widgets:
        cls = w.get("class")
        assert cls in QT_CLASSES or cls in declared, f"widget {w.get('name')}: class {cls} is not declared"
    used = {w.get("class") for w in widgets}
    assert set(declared) - used <= {"ctkMenuButton"}  # only bases of used widgets may be unused

    # the sections of the panel, Advanced collapsed; progress, status and log outside every section
    sections = {w.get("name"): w for w in widgets if w.get("class") == "ctkCollapsibleButton"}
    titles = [s.find("property[@name='text']/string").text for s in sections.values()]
    assert titles == ["Inputs", "Method", "Training", "Inference", "Label next", "Advanced"]
    assert sections["advancedCollapsibleButton"].find("property[@name='collapsed']/bool").text == "true"
    top_level = [w.get("name") for w in top.find("layout").findall("item/widget")]
    assert top_level[-3:] == ["progressBar", "statusLabel", "logPlainTextEdit"]

    # every MRML node selector gets the scene from the root widget
    selectors = {w.get("name") for w in widgets if w.find("property[@name='nodeTypes']") is not None}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("sender") == "SemiSeg"}
    assert selectors and selectors == connected


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def test_module_file_structure_and_widget_names_exist_in_ui():
    source = (EXT / "SemiSeg.py").read_text()
    tree = ast.parse(source)
    classes = _classes(tree)
    bases = {name: [b.id for b in c.bases if isinstance(b, ast.Name)] for name, c in classes.items()}
    assert bases["SemiSeg"] == ["ScriptedLoadableModule"]
    assert bases["SemiSegWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["SemiSegLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["SemiSegTest"] == ["ScriptedLoadableModuleTest"]
    ui_names = {w.get("name") for w in ET.parse(UI).getroot().iter("widget")}
    referenced = set(re.findall(r"self\.ui\.(\w+)", source))
    assert referenced and referenced <= ui_names, f"not in the .ui: {sorted(referenced - ui_names)}"

    # scripting API: blocking by default, with progress callbacks
    logic = {f.name: f for f in classes["SemiSegLogic"].body if isinstance(f, ast.FunctionDef)}
    for name in ("train", "segment", "resume"):
        args = logic[name].args
        defaults = dict(zip([a.arg for a in args.args][-len(args.defaults):], args.defaults))
        assert isinstance(defaults["waitForCompletion"], ast.Constant) and defaults["waitForCompletion"].value is True
        assert {"progressCallback", "logCallback", "finishedCallback"} <= set(defaults)
    # the widget stays thin: of the library it uses only the widget helpers (option rows, progress-bar text,
    # the panel state's type, the library reload); data, processes and MRML go through the logic
    widget_src = ast.get_source_segment(source, classes["SemiSegWidget"])
    used = set(re.findall(r"from SemiSegSlicerLib import (\w+)", widget_src))
    assert used <= {"optionform", "mainloop", "parameters"}, used
    assert "JobRunner" not in widget_src and "SemiSegSlicerLib." not in widget_src.replace(
        "SemiSegSlicerLib.reload_library()", "")
    test_methods = [f.name for f in classes["SemiSegTest"].body if isinstance(f, ast.FunctionDef)]
    assert "runTest" in test_methods and any(m.startswith("test_") for m in test_methods)


QT_FREE = ["mrml_export", "segment_classes", "mrml_import", "plotting", "catalog", "models", "process", "jobs",
           "parameters", "labeling", "optionform"]


@pytest.mark.parametrize("name", QT_FREE + ["mainloop"])
def test_library_is_free_of_qt_and_slicer_globals_but_for_the_main_loop(name):
    """Written against an explicit scene so it runs on real MRML outside Slicer: only mainloop.py meets Qt
    (a QTimer and slicer.app.processEvents, imported inside its functions)."""
    assert sorted(p.stem for p in (EXT / "SemiSegSlicerLib").glob("*.py") if p.stem != "__init__") == sorted(
        QT_FREE + ["mainloop", "dependencies"])  # dependencies: Slicer's pip, imported lazily
    source = (EXT / "SemiSegSlicerLib" / f"{name}.py").read_text()
    tree = ast.parse(source)
    top_imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_imports |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not top_imports & {"qt", "ctk", "slicer", "vtk", "torch"}, top_imports
    globals_used = [f"slicer.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                    and isinstance(n.value, ast.Name) and n.value.id == "slicer"
                    and n.attr in ("mrmlScene", "modules", "app")]
    assert globals_used == (["slicer.app"] if name == "mainloop" else [])
    assert ("import qt" in source) == (name == "mainloop")


def _function(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    return next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == name)


def _calls(node) -> list[ast.Call]:
    return sorted((n for n in ast.walk(node) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))


def _name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def test_widget_wiring_survives_errors_as_pythonqt_runs_it():
    """Widget-only code (Slicer runs it; checked statically): setup() wires every observer and signal before it
    asks the engine, and nothing in setup raises through tryWithErrorDisplay (which re-raises); signals
    blocked are unblocked in a finally; no '%%' reaches a QProgressBar; Reload reloads the library."""
    source = (EXT / "SemiSeg.py").read_text()
    tree = ast.parse(source)
    widget = _classes(tree)["SemiSegWidget"]
    setup = [_name(c) for c in _calls(_function(widget, "setup"))]
    first_engine_call = setup.index("populateFromEngine")
    assert "addObserver" in setup and "addObserverCallbacks" in setup
    assert max(i for i, n in enumerate(setup) if n in ("addObserver", "connect", "addObserverCallbacks")) < first_engine_call
    for name in ("setup", "populateFromEngine", "updateGUIFromParameterNode", "onMethodChanged"):
        assert "tryWithErrorDisplay" not in [_name(c) for c in _calls(_function(widget, name))], name
    blocking = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                and any(_name(c) == "blockSignals" for c in _calls(f))]
    assert blocking
    for f in blocking:  # every function that blocks signals unblocks them in a finally
        assert any(isinstance(t, ast.Try) and any(_name(c) == "blockSignals" for s in t.finalbody for c in _calls(s))
                   for t in ast.walk(f)), f.name
    assert '%%' not in source
    assert "reload_library" in [_name(c) for c in _calls(_function(widget, "onReload"))]
    qt_widgets = set(re.findall(r"qt\.(Q\w+)\(", source)) | set(re.findall(
        r"qt\.(Q\w+)\(", (EXT / "SemiSegSlicerLib" / "optionform.py").read_text()))
    assert qt_widgets <= QT_CLASSES | {"QTableWidgetItem", "QFormLayout", "QSettings"}, qt_widgets


def test_requirements_never_name_slicer_or_torch_packages():
    from_file = [ln.strip() for ln in (EXT / "Resources/requirements.txt").read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
    names = {re.split(r"[<>=!~\[ ;]", r)[0].lower() for r in from_file}
    assert names and not names & {"torch", "torchvision", "simpleitk", "numpy", "vtk", "scipy"}


def test_dependency_check_skips_slicer_packages_and_finds_missing_ones(tmp_path):
    import sys
    sys.path.insert(0, str(EXT))
    from SemiSegSlicerLib import dependencies
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy>=1\nSimpleITK\ntorch>=2\nslicerio>=1.0\nslicerio>=999\n"
                   "no-such-package-semiseg>=1 ; python_version >= '3'\nno-such-package-py2 ; python_version < '3'\n-r other.txt\n")
    reqs = dependencies.read_requirements(req)
    assert reqs == ["numpy>=1", "SimpleITK", "torch>=2", "slicerio>=1.0", "slicerio>=999",
                    "no-such-package-semiseg>=1 ; python_version >= '3'", "no-such-package-py2 ; python_version < '3'"]
    # Slicer's own packages and torch are never reported (never installed); versions and markers count
    assert dependencies.missing_requirements(reqs) == ["slicerio>=999", "no-such-package-semiseg>=1 ; python_version >= '3'"]
    ok, text = dependencies.torch_status()
    assert ok and text.startswith("torch ")
