"""SemiSeg: train a semi-supervised segmentation model from a few segmentations and many unlabeled
volumes, then segment new volumes — from a panel in 3D Slicer, or from the Python console:

    logic = slicer.util.getModuleLogic("SemiSeg")  # or SemiSeg.SemiSegLogic()
    result = logic.train([segmentationNode], unlabeled=[volume2, volume3], method="mean_teacher", iterations=2000)
    nodes = logic.segment([volume4])

Module / Widget / Logic / Test as every scripted module. The widget only shows and forwards; the
logic exports the scene into a job folder (SemiSegSlicerLib.mrml_export), runs the trainer
(``PythonSlicer -m semiseg_trainer run --job DIR``) in a background process (SemiSegSlicerLib.process),
draws the loss/Dice curves (SemiSegSlicerLib.plotting) and loads predictions back as segmentation
nodes (SemiSegSlicerLib.mrml_import).
"""
from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent


def _ensureEnginePath() -> None:
    """Installed extension: the engine packages lie beside this module (qt-scripted-modules, already on
    sys.path). Running from a source checkout: add SemiSegLib/ and SemiSegTrainer/ of the checkout."""
    for folder in ("SemiSegLib", "SemiSegTrainer"):
        path = MODULE_DIR.parent / folder
        if path.is_dir() and str(path) not in sys.path:
            sys.path.append(str(path))


_ensureEnginePath()


def _tr(text: str) -> str:
    try:
        return slicer.i18n.tr(text)  # Slicer >= 5.4
    except AttributeError:
        return text


#
# SemiSeg
#
class SemiSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _tr("SemiSeg")
        self.parent.categories = [_tr("Segmentation")]
        self.parent.dependencies = []  # PyTorchUtils is optional at load time: checked on first use
        self.parent.contributors = ["SemiSeg developers"]
        self.parent.helpText = _tr(
            "Train a semi-supervised segmentation model from a few segmentations (each with its source volume) "
            "and many unlabeled volumes, watch it learn, then segment new volumes. Training runs in a background "
            "process; the panel stays usable and Cancel keeps a resumable checkpoint. "
            "Scripting: <code>slicer.util.getModuleLogic('SemiSeg').train(...)</code> and <code>.segment(...)</code>.")
        self.parent.acknowledgementText = _tr(
            "SemiSeg reimplements published semi-supervised methods (Mean Teacher, UA-MT and others); see each "
            "method's description for its paper. Training needs the PyTorch extension.")


#
# SemiSegWidget
#
class SemiSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin: reads the panel, calls the logic, shows what the logic reports."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.sourceOverrides: dict[str, str] = {}   # segmentation ID -> volume ID picked by hand
        self.optionWidgets: dict[str, object] = {}
        self.optionsContainer = None
        self.trainingWidgets = {}
        self.methodInfos = {}

    # ------------------------------------------------------------------ setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemiSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SemiSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.ui.labeledSegmentationsComboBox.connect("checkedNodesChanged()", self.updateInputs)
        self.ui.unlabeledVolumesComboBox.connect("checkedNodesChanged()", self.updateInputs)
        self.ui.segmentVolumesComboBox.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.allowMissingClassesCheckBox.connect("toggled(bool)", self.updateInputs)
        self.ui.casesTableWidget.connect("itemSelectionChanged()", self.updatePairButton)
        self.ui.setSourceVolumeButton.connect("clicked(bool)", self.onSetSourceVolume)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.dimensionComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.workspacePathLineEdit.connect("currentPathChanged(QString)", self.onWorkspaceChanged)

        self.ui.dimensionComboBox.addItem(_tr("3D (V-Net on patches)"), 3)
        self.ui.dimensionComboBox.addItem(_tr("2D (U-Net on slices)"), 2)
        self.ui.workspacePathLineEdit.currentPath = str(self.logic.workspace)
        self.populateFromEngine()
        self.logic.addObserverCallbacks(self.onJobEvent, self.onJobLog, self.onJobFinished)
        self.updateInputs()
        self.updateButtons()

    def cleanup(self):
        self.removeObservers()
        if self.logic:
            self.logic.removeObserverCallbacks(self.onJobEvent, self.onJobLog, self.onJobFinished)
            self.logic.shutdown()  # never leave a trainer running without its module

    def enter(self):
        self.updateInputs()
        self.updateButtons()  # a job may have finished while the module was not shown

    def onSceneStartClose(self, caller, event):
        if self.logic and self.logic.isRunning:
            self.log(_tr("Scene closed: stopping the running job (its checkpoint is kept for Resume)."))
            self.logic.cancel()
        self.sourceOverrides.clear()

    # ------------------------------------------------------------------ engine-derived widgets
    def populateFromEngine(self):
        """Methods, presets, devices: only once torch imports (never installs anything here)."""
        ok, text = self.logic.dependencyStatus()
        self.ui.dependencyStatusLabel.text = text
        self.ui.installDependenciesButton.visible = not ok
        if not ok:
            self.ui.methodComboBox.clear()
            self.ui.methodComboBox.addItem(_tr("(install PyTorch first)"), "")
            return
        with slicer.util.tryWithErrorDisplay(_tr("Cannot read the SemiSeg engine's methods."), waitCursor=True):
            self.ui.methodComboBox.blockSignals(True)
            self.ui.methodComboBox.clear()
            self.methodInfos = {m.name: m for m in self.logic.methods(3)}
            for m in self.methodInfos.values():
                self.ui.methodComboBox.addItem(m.name, m.name)
                self.ui.methodComboBox.setItemData(self.ui.methodComboBox.count - 1, m.description, 3)  # tooltip
            index = self.ui.methodComboBox.findData("mean_teacher")
            self.ui.methodComboBox.setCurrentIndex(max(index, 0))
            self.ui.methodComboBox.blockSignals(False)
            self.ui.presetComboBox.blockSignals(True)
            self.ui.presetComboBox.clear()
            self.ui.presetComboBox.addItem(_tr("generic (by dimension)"), "")
            for p in self.logic.presets():
                self.ui.presetComboBox.addItem(p, p)
            self.ui.presetComboBox.blockSignals(False)
            info = self.logic.deviceInfo()
            self.ui.deviceComboBox.clear()
            for value, label in info["choices"]:
                self.ui.deviceComboBox.addItem(label, value)
            self.ui.deviceInfoLabel.text = info["text"]
            self.onMethodChanged()

    def onMethodChanged(self, *_):
        """Description and the Advanced options of the chosen method, with the paper's defaults for the
        chosen preset/dimension (generated from the method's Options dataclass)."""
        import qt
        name = self.ui.methodComboBox.currentData
        if not name or not self.methodInfos:
            return
        dim = int(self.ui.dimensionComboBox.currentData or 3)
        preset = self.ui.presetComboBox.currentData or ""
        info = {m.name: m for m in self.logic.methods(dim, preset)}.get(name)
        if info is None:
            return
        self.ui.methodDescriptionLabel.text = info.description + (
            "" if info.uses_unlabeled else _tr(" (does not use the unlabeled volumes)"))
        if self.optionsContainer is not None:
            self.optionsContainer.setParent(None)
            self.optionsContainer.deleteLater()
        self.optionsContainer = qt.QWidget()
        form = qt.QFormLayout(self.optionsContainer)
        self.optionWidgets = self._addOptionRows(form, info.options)
        # the training options shared by every method (lr, schedule, EMA, precision, planning, class map, ...)
        form.addRow(qt.QLabel("<b>" + _tr("Training (all methods)") + "</b>"))
        self.trainingWidgets = self._addOptionRows(form, self.logic.trainingOptions(name, dim, preset))
        self.ui.methodOptionsFrame.layout().addWidget(self.optionsContainer)
        defaults = self.logic.resolvedDefaults(name, dim, preset)
        for box, key in ((self.ui.iterationsSpinBox, "iterations"), (self.ui.labeledBatchSpinBox, "labeled_batch"),
                         (self.ui.unlabeledBatchSpinBox, "unlabeled_batch")):
            box.specialValueText = _tr("preset default") + (f" ({defaults[key]})" if key in defaults else "")

    def _addOptionRows(self, form, options) -> dict:
        """One labelled widget per option (help as tooltip); returns {name: (option, widget)}."""
        import qt
        widgets = {}
        for o in options:
            w = self._optionWidget(o)
            w.toolTip = o.help
            label = qt.QLabel(o.label + ":")
            label.toolTip = o.help
            form.addRow(label, w)
            widgets[o.name] = (o, w)
        return widgets

    @staticmethod
    def _optionWidget(o):
        import qt
        if o.kind == "bool":
            w = qt.QCheckBox()
            w.checked = bool(o.default)
        elif o.kind == "int":
            w = qt.QSpinBox()
            w.setRange(-10**9, 10**9)
            w.value = int(o.default)
        elif o.kind == "float":
            w = qt.QDoubleSpinBox()
            w.setDecimals(6)
            w.setRange(-1e9, 1e9)
            w.value = float(o.default)
        elif o.kind == "choice":
            w = qt.QComboBox()
            for c in o.choices:
                w.addItem(str(c), c)
            w.setCurrentIndex(max(0, w.findData(o.default)))
        else:
            w = qt.QLineEdit(" ".join(map(str, o.default)) if isinstance(o.default, (list, tuple)) else str(o.default))
        return w

    def methodOptions(self) -> dict:
        """Only the method options the user changed from the displayed default."""
        return self._changedValues(self.optionWidgets)

    def trainingOptions(self) -> dict:
        """Only the training options the user changed from the displayed default."""
        return self._changedValues(getattr(self, "trainingWidgets", {}))

    @staticmethod
    def _changedValues(widgets) -> dict:
        out = {}
        for name, (o, w) in widgets.items():
            if o.kind == "bool":
                v = bool(w.checked)
            elif o.kind in ("int", "float"):
                v = type(o.default)(w.value)
            elif o.kind == "choice":
                v = w.currentData
            elif o.kind in ("ints", "floats"):
                v = [(int if o.kind == "ints" else float)(x) for x in w.text.split()]
            else:
                v = w.text
            if v != o.default and not (o.kind in ("ints", "floats") and list(v) == list(o.default)):
                out[name] = v
        return out

    # ------------------------------------------------------------------ inputs
    def labeledPairs(self):
        return self.logic.pairCases(self.ui.labeledSegmentationsComboBox.checkedNodes(), self.sourceOverrides)

    def updateInputs(self, *_):
        import qt
        segs = self.ui.labeledSegmentationsComboBox.checkedNodes()
        table = self.ui.casesTableWidget
        table.setRowCount(len(segs))
        for row, seg in enumerate(segs):
            vol = self.logic.sourceVolumeFor(seg, self.sourceOverrides)
            for col, text in enumerate((seg.GetName(), vol.GetName() if vol else _tr("(pick a volume)"))):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, seg.GetID())
                table.setItem(row, col, item)
        self.ui.classesLabel.text = self.logic.classTable(segs, self.ui.allowMissingClassesCheckBox.checked).html()
        self.updatePairButton()
        self.updateButtons()

    def updatePairButton(self, *_):
        self.ui.setSourceVolumeButton.enabled = bool(self.ui.casesTableWidget.selectedItems())

    def onSetSourceVolume(self):
        vol = self.ui.sourceVolumeComboBox.currentNode()
        for item in self.ui.casesTableWidget.selectedItems():
            segId = item.data(0x0100)  # Qt.UserRole
            if vol is None:
                self.sourceOverrides.pop(segId, None)
            else:
                self.sourceOverrides[segId] = vol.GetID()
        self.updateInputs()

    def onWorkspaceChanged(self, path):
        if path:
            self.logic.setWorkspace(path)

    # ------------------------------------------------------------------ actions
    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay(_tr("Installing SemiSeg's dependencies failed."), waitCursor=True):
            self.logic.setupDependencies(ask=True)
        self.populateFromEngine()

    def onTrainButton(self):
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.trainButton.enabled = False  # re-enabled when the trainer has stopped
            return
        with slicer.util.tryWithErrorDisplay(_tr("Training could not start."), waitCursor=True):
            self.logic.setupDependencies(ask=True)
            if not self.methodInfos:
                self.populateFromEngine()
            self.ui.logPlainTextEdit.clear()
            self.logic.train(
                self.labeledPairs(), unlabeled=self.ui.unlabeledVolumesComboBox.checkedNodes(),
                method=self.ui.methodComboBox.currentData, dim=int(self.ui.dimensionComboBox.currentData),
                preset=self.ui.presetComboBox.currentData or "", iterations=self.ui.iterationsSpinBox.value,
                labeledBatch=self.ui.labeledBatchSpinBox.value, unlabeledBatch=self.ui.unlabeledBatchSpinBox.value,
                device=self.ui.deviceComboBox.currentData or "auto", methodOptions=self.methodOptions(),
                validationCases=self.ui.validationCasesSpinBox.value,
                allowMissingClasses=self.ui.allowMissingClassesCheckBox.checked,
                extraConfig=self.trainingOptions(), waitForCompletion=False)
            self.logic.showPlot()
        self.updateButtons()

    def onResumeButton(self):
        with slicer.util.tryWithErrorDisplay(_tr("Training could not resume."), waitCursor=True):
            self.logic.resume(waitForCompletion=False)
        self.updateButtons()

    def onSegmentButton(self):
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.segmentButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay(_tr("Segmentation could not start."), waitCursor=True):
            self.logic.setupDependencies(ask=True)
            self.logic.segment(self.ui.segmentVolumesComboBox.checkedNodes(),
                               device=self.ui.deviceComboBox.currentData or "auto",
                               show3D=self.ui.show3DCheckBox.checked, waitForCompletion=False)
        self.updateButtons()

    def onSaveModel(self):
        with slicer.util.tryWithErrorDisplay(_tr("The model could not be saved."), waitCursor=True):
            folder = self.logic.saveModel()
            self.log(_tr("Model saved: ") + str(folder))
        self.updateButtons()

    def onLoadModel(self):
        with slicer.util.tryWithErrorDisplay(_tr("The model could not be loaded."), waitCursor=True):
            self.logic.loadModel(self.ui.modelPathLineEdit.currentPath)
        self.updateButtons()

    def onShowPlot(self):
        self.logic.showPlot()

    # ------------------------------------------------------------------ job feedback
    def onJobEvent(self, progress, event):
        self.ui.progressBar.value = int(round(100 * progress.fraction))
        self.ui.progressBar.format = progress.status_text().replace("%", "%%")  # no %p/%v placeholders
        self.ui.statusLabel.text = progress.status_text()
        kind = event.get("event")
        if kind in ("log", "started", "checkpoint", "predicted", "validation", "error"):
            self.log(SemiSegLogic.describeEvent(event))

    def onJobLog(self, text):
        self.log(text)

    def onJobFinished(self, result):
        self.log(f"{result.status}: {result.message}")
        if result.status == "failed":
            slicer.util.errorDisplay(result.message, detailedText=(result.details or "") +
                                     f"\n\nJob folder (kept): {result.job_dir}")
        for node in getattr(result, "nodes", []) or []:
            self.ui.segmentationShow3DButton.setSegmentationNode(node)
        self.updateButtons()

    def log(self, text):
        self.ui.logPlainTextEdit.appendPlainText(str(text))

    def updateButtons(self):
        running = self.logic.isRunning
        task = self.logic.task if running else ""
        self.ui.trainButton.text = _tr("Cancel training") if task == "train" else _tr("Train")
        self.ui.trainButton.enabled = (task == "train" and not self.logic.cancelRequested) or (
            not running and bool(self.ui.labeledSegmentationsComboBox.checkedNodes()))
        self.ui.segmentButton.text = _tr("Cancel segmentation") if task == "segment" else _tr("Segment")
        self.ui.segmentButton.enabled = (task == "segment" and not self.logic.cancelRequested) or (
            not running and self.logic.model is not None and bool(self.ui.segmentVolumesComboBox.checkedNodes()))
        self.ui.resumeButton.enabled = not running and self.logic.canResume()
        self.ui.saveModelButton.enabled = not running and self.logic.model is not None
        self.ui.modelLabel.text = self.logic.modelDescription()
        if not running:
            self.ui.progressBar.format = "%p%"


#
# SemiSegLogic
#
class SemiSegLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from scripts and tests without the widget.

    ``train(...)`` and ``segment(...)`` block by default (``waitForCompletion=True``, for scripts) and
    return the job's result; with ``waitForCompletion=False`` they return at once and report through
    ``progressCallback(progress, event)``, ``logCallback(text)`` and ``finishedCallback(result)``.
    One job at a time.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        import qt
        settings = qt.QSettings()
        self.workspace = Path(settings.value("SemiSeg/Workspace", str(Path.home() / "SemiSeg")))
        self.runner = None
        self.task = ""
        self.jobDir: Path | None = None
        self.lastTrainingJob: Path | None = None
        self.model: dict | None = None          # metadata of the current (trained or loaded) model
        self.plot = None
        self.lastSegmentations = []
        self._observers: list[tuple] = []
        self._callbacks = (None, None, None)
        self._segmentOptions = {}

    def setWorkspace(self, path):
        """Folder for job folders (jobs/) and saved models (models/); remembered in the settings."""
        import qt
        self.workspace = Path(path)
        qt.QSettings().setValue("SemiSeg/Workspace", str(self.workspace))

    # ------------------------------------------------------------------ observers (the widget)
    def addObserverCallbacks(self, onEvent, onLog, onFinished):
        self._observers.append((onEvent, onLog, onFinished))

    def removeObserverCallbacks(self, onEvent, onLog, onFinished):
        self._observers = [o for o in self._observers if o != (onEvent, onLog, onFinished)]

    # ------------------------------------------------------------------ engine facts
    @staticmethod
    def requirementsPath() -> Path:
        return MODULE_DIR / "Resources" / "requirements.txt"

    def dependencyStatus(self):
        from SemiSegSlicerLib import dependencies
        return dependencies.torch_status()

    def setupDependencies(self, ask: bool = True) -> bool:
        from SemiSegSlicerLib import dependencies
        return dependencies.ensure_dependencies(self.requirementsPath(), ask=ask)

    def methods(self, dim: int = 3, preset: str = ""):
        from SemiSegSlicerLib import catalog
        return catalog.methods(preset or catalog.default_preset(dim), dim)

    def presets(self):
        from SemiSegSlicerLib import catalog
        return catalog.presets()

    @staticmethod
    def resolvedDefaults(method, dim=3, preset="") -> dict:
        """The configuration a method/dimension/preset trains with when nothing else is set ({} if invalid)."""
        from SemiSegSlicerLib import catalog
        try:
            return catalog.resolved(catalog.training_config(method, dim, preset))
        except Exception as e:  # noqa: BLE001 - shown as "preset default" without a number
            logging.info("SemiSeg: %s", e)
            return {}

    @staticmethod
    def trainingOptions(method, dim=3, preset=""):
        """The shared training options (TrainConfig fields) with the values this method/preset uses."""
        from SemiSegSlicerLib import catalog
        try:
            return catalog.training_options(method, dim, preset)
        except Exception as e:  # noqa: BLE001 - an impossible combination shows no training options
            logging.info("SemiSeg: %s", e)
            return []

    def deviceInfo(self):
        from SemiSegSlicerLib import catalog
        return catalog.device_info()

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def sourceVolumeFor(segmentationNode, overrides=None):
        from SemiSegSlicerLib import mrml_export
        volumeId = (overrides or {}).get(segmentationNode.GetID())
        node = slicer.mrmlScene.GetNodeByID(volumeId) if volumeId else None
        return node or mrml_export.source_volume(segmentationNode)

    def pairCases(self, segmentationNodes, overrides=None):
        from SemiSegSlicerLib import mrml_export
        chosen = {s.GetID(): self.sourceVolumeFor(s, overrides) for s in segmentationNodes}
        return mrml_export.pair_cases(segmentationNodes, {k: v for k, v in chosen.items() if v is not None})

    @staticmethod
    def classTable(segmentationNodes, allowMissingClasses=False):
        from SemiSegSlicerLib import mrml_export
        return mrml_export.collect_classes(segmentationNodes, allow_missing=allowMissingClasses)

    # ------------------------------------------------------------------ jobs
    @property
    def isRunning(self) -> bool:
        return self.runner is not None and self.runner.running

    @property
    def cancelRequested(self) -> bool:
        return bool(self.runner and self.runner.cancel_requested)

    def newJobDir(self, kind: str) -> Path:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        job = Path(self.workspace) / "jobs" / f"{kind}-{stamp}"
        n = 2
        while job.exists():
            job, n = Path(self.workspace) / "jobs" / f"{kind}-{stamp}-{n}", n + 1
        job.mkdir(parents=True)
        return job

    def train(self, labeled, unlabeled=(), method="mean_teacher", dim=3, preset="", iterations=0, labeledBatch=0,
              unlabeledBatch=0, patchSize=(), device="auto", methodOptions=None, validationCases=0, valEvery=None,
              allowMissingClasses=False, extraConfig=None, waitForCompletion=True, progressCallback=None,
              logCallback=None, finishedCallback=None, timeout=None):
        """Export the cases, write the job, start the trainer. ``labeled``: segmentation nodes (source volume
        from the reference-geometry link) or (segmentation, volume) pairs."""
        from SemiSegSlicerLib import catalog, mrml_export, plotting
        from semiseg_trainer import protocol
        self._refuseConcurrent()
        pairs = [tuple(p) if isinstance(p, (tuple, list)) else self.pairCases([p])[0] for p in labeled]
        job = self.newJobDir("train")
        try:
            export = mrml_export.export_training_data(slicer.mrmlScene, job, pairs, list(unlabeled),
                                                      validation_cases=validationCases,
                                                      allow_missing_classes=allowMissingClasses)
        except Exception:
            logging.info("SemiSeg: export failed; job folder kept: %s", job)
            raise
        config = catalog.training_config(method, dim, preset, iterations, labeledBatch, unlabeledBatch, patchSize,
                                         device, val_every=valEvery if valEvery is not None else
                                         (None if validationCases else 0), method_options=methodOptions,
                                         extra=extraConfig)
        catalog.resolved(config)  # an impossible combination fails here, with the engine's one line
        protocol.write_job(job, mrml_export.training_job_spec(export, config))
        for w in export.warnings:
            self._log(f"note: {w}", logCallback)
        self._log(f"training job {job}: {export.summary()}", logCallback)
        self.lastTrainingJob = job
        self.plot = plotting.TrainingPlot(slicer.mrmlScene, f"SemiSeg {method}")
        return self._start("train", job, device, waitForCompletion, progressCallback, logCallback, finishedCallback, timeout)

    def canResume(self) -> bool:
        job = self.lastTrainingJob
        return bool(job and (job / "run" / "last.pt").is_file() and not (job / "run" / "metrics.json").is_file())

    def resume(self, jobDir=None, waitForCompletion=True, progressCallback=None, logCallback=None,
               finishedCallback=None, timeout=None):
        """Continue a cancelled training job from its last checkpoint."""
        from SemiSegSlicerLib import plotting
        from semiseg_trainer import protocol
        self._refuseConcurrent()
        job = Path(jobDir) if jobDir else self.lastTrainingJob
        if job is None or not (job / "run" / "last.pt").is_file():
            raise ValueError("nothing to resume: no training job with a checkpoint")
        spec = protocol.read_job(job)
        spec["resume"] = True
        protocol.write_job(job, spec)
        self.lastTrainingJob = job
        if self.plot is None:
            self.plot = plotting.TrainingPlot(slicer.mrmlScene, f"SemiSeg {spec['config'].get('method', '')}")
        device = spec.get("config", {}).get("device", "auto")
        return self._start("train", job, device, waitForCompletion, progressCallback, logCallback, finishedCallback, timeout)

    def segment(self, volumes, model=None, device="auto", show3D=False, waitForCompletion=True,
                progressCallback=None, logCallback=None, finishedCallback=None, timeout=None):
        """Segment volume nodes with ``model`` (a saved model folder/file) or the current model. Blocking:
        returns the new segmentation nodes (``"<volume> SemiSeg"``)."""
        from SemiSegSlicerLib import mrml_export
        from semiseg_trainer import protocol
        self._refuseConcurrent()
        if model is not None:
            self.loadModel(model)
        if self.model is None:
            raise ValueError("no model: train one, or load a saved model")
        job = self.newJobDir("segment")
        inputs = mrml_export.export_segment_inputs(job, list(volumes))
        protocol.write_job(job, mrml_export.segment_job_spec(inputs, self.model["checkpoint"], device))
        self._segmentOptions = {"show3D": show3D}
        result = self._start("segment", job, device, waitForCompletion, progressCallback, logCallback,
                             finishedCallback, timeout)
        return getattr(result, "nodes", None) if waitForCompletion else None

    def cancel(self):
        """Graceful: the trainer checkpoints and exits; its process tree is killed after a grace period."""
        if self.isRunning:
            self.runner.cancel()

    def shutdown(self, grace: float = 5.0):
        """Module cleanup / application exit: ask to stop, wait a little, then kill the process tree."""
        if self.isRunning:
            self.runner.cancel(grace_seconds=grace)
            if self.runner.wait(timeout=grace) is None:
                self.runner.kill()

    def _refuseConcurrent(self):
        if self.isRunning:
            raise RuntimeError(f"a {self.task} job is already running ({self.jobDir}); cancel it first")

    def _start(self, task, job, device, wait, progressCallback, logCallback, finishedCallback, timeout):
        from SemiSegSlicerLib.process import JobRunner, PopenBackend
        self.task, self.jobDir = task, job
        self._callbacks = (progressCallback, logCallback, finishedCallback)
        self.runner = JobRunner(job, backend=self._backend(), python=self.pythonExecutable(),
                                cpu_only=(device == "cpu"), on_event=self._onEvent, on_log=self._onLog,
                                on_finished=self._onFinished)
        self.runner.start()
        self._log(f"started {task} job: {job}", None)
        if not wait:
            if isinstance(self.runner.backend, PopenBackend):
                self._pollWithTimer()
            return None
        result = self.runner.wait(timeout=timeout)
        if result is None:
            self.runner.kill()
            result = self.runner.wait(timeout=30)
        if result is not None and result.status == "failed":
            raise RuntimeError(f"SemiSeg {task} failed: {result.message} (job folder: {job})")
        return result

    @staticmethod
    def _backend():
        """qt.QProcess in Slicer; a plain subprocess where PythonQt is missing (headless scripts, tests)."""
        try:
            import qt
            if hasattr(qt, "QProcess"):
                from SemiSegSlicerLib.process import QtProcessBackend
                return QtProcessBackend()
        except Exception as e:  # noqa: BLE001 - fall back rather than fail to start
            logging.warning("SemiSeg: QProcess unavailable (%s); using a subprocess", e)
        from SemiSegSlicerLib.process import PopenBackend
        return PopenBackend()

    def _pollWithTimer(self):
        """A subprocess backend delivers output only when polled: poll from a Qt timer if there is one
        (otherwise the caller polls ``logic.runner.poll()`` or waits)."""
        try:
            import qt
            timer = qt.QTimer()
        except Exception:  # noqa: BLE001
            return
        runner = self.runner

        def tick():
            runner.poll()
            if not runner.running:
                timer.stop()
        timer.timeout.connect(tick)
        timer.start(200)
        self._pollTimer = timer

    @staticmethod
    def pythonExecutable() -> str:
        """PythonSlicer inside Slicer (``sys.executable`` is set to it), else this interpreter."""
        return sys.executable

    # ------------------------------------------------------------------ job callbacks
    def _log(self, text, callback):
        logging.info("SemiSeg: %s", text)
        for cb in [callback] + [o[1] for o in self._observers]:
            if cb:
                cb(text)

    def _onEvent(self, event):
        progress = self.runner.progress
        if self.task == "train" and event.get("event") in ("iteration", "validation", "started") and self.plot:
            try:
                self.plot.update(progress)
            except Exception as e:  # noqa: BLE001 - the scene may be closing; the plot is not worth a failure
                logging.debug("SemiSeg: plot update skipped: %s", e)
        for cb in [self._callbacks[0]] + [o[0] for o in self._observers]:
            if cb:
                cb(progress, event)

    def _onLog(self, text):
        for cb in [self._callbacks[1]] + [o[1] for o in self._observers]:
            if cb:
                cb(text)

    def _onFinished(self, result):
        from SemiSegSlicerLib import models, mrml_import
        result.nodes = []
        try:
            if result.ok and self.task == "train":
                self.model = models.job_model_info(result.job_dir)
            elif result.ok and self.task == "segment":
                result.nodes = mrml_import.import_job_predictions(
                    slicer.mrmlScene, result.job_dir, classes=self.model.get("classes") if self.model else None,
                    show3d=self._segmentOptions.get("show3D", False))
                self.lastSegmentations = result.nodes
        except Exception as e:  # noqa: BLE001 - report, never lose the result
            result.status, result.message, result.details = "failed", f"loading the results failed: {e}", ""
        for cb in [self._callbacks[2]] + [o[2] for o in self._observers]:
            if cb:
                cb(result)

    @staticmethod
    def describeEvent(e: dict) -> str:
        kind = e.get("event")
        if kind == "started":
            if e.get("task") == "segment":
                return f"segmenting {e.get('total')} volume(s) on {e.get('device')}"
            return f"training {e.get('method')} on {e.get('device')}: {e.get('data')} (iteration {e.get('iteration')})"
        if kind == "validation":
            return f"iteration {e.get('iteration')}: validation Dice {100 * e.get('dice', 0):.1f}%"
        if kind == "checkpoint":
            return f"checkpoint at iteration {e.get('iteration')}"
        if kind == "predicted":
            return f"segmented {Path(str(e.get('input', ''))).name} ({e.get('index')}/{e.get('total')})"
        if kind == "error":
            return f"error: {e.get('message')}"
        return str(e.get("message", e))

    # ------------------------------------------------------------------ models
    def saveModel(self, folder=None) -> Path:
        from SemiSegSlicerLib import models
        if self.lastTrainingJob is None:
            raise ValueError("no trained model to save: train first")
        dest = Path(folder) if folder else Path(self.workspace) / "models" / self.lastTrainingJob.name
        return models.save_model(self.lastTrainingJob, dest)

    def loadModel(self, path) -> dict:
        from SemiSegSlicerLib import models
        self.model = models.load_model_info(path)
        return self.model

    def modelDescription(self) -> str:
        if not self.model:
            return "no model (train one, or load a saved model)"
        dice = self.model.get("best_val_dice")
        classes = ", ".join(c["name"] for c in self.model.get("classes", []))
        return (f"{self.model.get('name')}: {self.model.get('method')}, classes {classes}"
                + (f", validation Dice {100 * dice:.1f}%" if dice else ""))

    # ------------------------------------------------------------------ plot
    def showPlot(self):
        if self.plot is not None and self.plot.chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(self.plot.chart)


#
# SemiSegTest
#
class SemiSegTest(ScriptedLoadableModuleTest):
    """A short CPU run through the logic on a tiny synthetic scene (Slicer's ctest / Self Tests).
    Skipped with a message when PyTorch is not installed (nothing is installed in testing mode)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_train_and_segment_tiny_scene()

    def _volume(self, name, seed):
        import numpy as np
        rng = np.random.default_rng(seed)
        a = rng.normal(0, 0.2, (4, 32, 32)).astype(np.float32)
        k, j, i = np.mgrid[:4, :32, :32]
        disk = (j - 16 - seed) ** 2 + (i - 14 + seed) ** 2 < 49
        a[disk] += 1.0
        node = slicer.util.addVolumeFromArray(a, ijkToRAS=None, name=name)
        node.SetSpacing(0.8, 0.8, 2.0)
        return node, disk

    def test_train_and_segment_tiny_scene(self):
        import numpy as np
        from SemiSegSlicerLib import dependencies, mrml_export
        self.delayDisplay("SemiSeg: tiny synthetic training")
        ok, text = dependencies.torch_status()
        if not ok:
            self.delayDisplay(f"skipped: {text}")
            return
        labeled, disk = self._volume("labeled", 0)
        unlabeled = [self._volume(f"unlabeled {s}", s)[0] for s in (1, 2)]
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(labeled)
        segId = seg.GetSegmentation().AddEmptySegment("disk", "disk", [0.9, 0.2, 0.2])
        slicer.util.updateSegmentBinaryLabelmapFromArray(disk.astype(np.uint8), seg, segId, labeled)

        logic = SemiSegLogic()
        logic.workspace = Path(slicer.app.temporaryPath) / "SemiSegTest"
        events = []
        result = logic.train([seg], unlabeled=unlabeled, method="mean_teacher", dim=2, iterations=20,
                             labeledBatch=2, unlabeledBatch=2, device="cpu", patchSize=(32, 32),
                             extraConfig={"threads": 1, "log_every": 5},
                             progressCallback=lambda p, e: events.append(e))
        self.assertEqual(result.status, "completed", result.message)
        self.assertTrue(any(e["event"] == "iteration" for e in events))
        self.assertEqual(logic.plot.values("iteration")[-1], 20)

        nodes = logic.segment([unlabeled[0]], device="cpu")
        self.assertEqual(len(nodes), 1)
        node = nodes[0]
        self.assertEqual(node.GetName(), "unlabeled 1 SemiSeg")
        names = [s.GetName() for _, s in mrml_export.segments_of(node)]
        self.assertEqual(names, ["disk"])
        for got, want in zip(mrml_export.segments_of(node)[0][1].GetColor(), (0.9, 0.2, 0.2)):
            self.assertAlmostEqual(got, want, places=5)
        self.assertIs(mrml_export.source_volume(node), unlabeled[0])
        self.delayDisplay("SemiSeg test passed")
