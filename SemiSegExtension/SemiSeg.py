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
    """Thin: reads the panel, calls the logic, shows what the logic reports. The panel's choices live in
    the module's parameter node (see the library's parameters module), so they are saved with the scene."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.sourceOverrides: dict[str, str] = {}   # segmentation ID -> volume ID picked by hand
        self.optionRows = {}                         # method options: name -> optionform.OptionRow
        self.trainingRows = {}                       # shared training options
        self.optionsContainer = None
        self.methodInfos = {}
        self._updatingGUI = False

    # ------------------------------------------------------------------ setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemiSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SemiSegLogic()

        # observers and connections first: nothing below may leave the panel half wired
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.ui.labeledSegmentationsComboBox.connect("checkedNodesChanged()", self.updateInputs)
        self.ui.unlabeledVolumesComboBox.connect("checkedNodesChanged()", self.updateInputs)
        self.ui.segmentVolumesComboBox.connect("checkedNodesChanged()", self.updateButtons)
        self.ui.allowMissingClassesCheckBox.connect("toggled(bool)", self.updateInputs)
        self.ui.casesTableWidget.connect("itemSelectionChanged()", self.updatePairButton)
        self.ui.setSourceVolumeButton.connect("clicked(bool)", self.onSetSourceVolume)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.dimensionComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        for box in (self.ui.iterationsSpinBox, self.ui.labeledBatchSpinBox, self.ui.unlabeledBatchSpinBox,
                    self.ui.validationCasesSpinBox, self.ui.timeBudgetSpinBox, self.ui.keepJobsSpinBox):
            box.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlot)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.refreshEngineButton.connect("clicked(bool)", self.onRefreshEngine)
        self.ui.cleanUpJobsButton.connect("clicked(bool)", self.onCleanUpJobs)
        self.ui.suggestButton.connect("clicked(bool)", self.onSuggestButton)
        self.ui.addToLabeledButton.connect("clicked(bool)", self.onAddToLabeled)
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrainButton)
        self.ui.loadVersionButton.connect("clicked(bool)", self.onLoadVersion)
        self.ui.correctedSegmentationComboBox.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.workspacePathLineEdit.connect("currentPathChanged(QString)", self.onWorkspaceChanged)
        self.logic.addObserverCallbacks(self.onJobEvent, self.onJobLog, self.onJobFinished)

        self.ui.dimensionComboBox.addItem(_tr("3D (V-Net on patches)"), 3)
        self.ui.dimensionComboBox.addItem(_tr("2D (U-Net on slices)"), 2)
        for value, label in (("entropy", _tr("uncertainty (entropy)")), ("margin", _tr("uncertainty (margin)")),
                             ("teacher-disagreement", _tr("disagreement with the EMA teacher")),
                             ("mc-dropout", _tr("disagreement of dropout passes (MC dropout)")),
                             ("random", _tr("random (for comparison)"))):
            self.ui.suggestStrategyComboBox.addItem(label, value)
        self.populateFromEngine()
        self.updateGUIFromParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.logic:
            self.logic.removeObserverCallbacks(self.onJobEvent, self.onJobLog, self.onJobFinished)
            self.logic.shutdown()  # never leave a trainer running without its module

    def onReload(self):
        """Slicer's Reload reloads SemiSeg.py only: reload the module's library too."""
        import SemiSegSlicerLib
        SemiSegSlicerLib.reload_library()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.updateGUIFromParameterNode()  # a job may have finished while the module was not shown

    def onSceneStartClose(self, caller, event):
        if self.logic:
            message = self.logic.sceneAboutToClose()
            if message:
                self.log(message)
        self.sourceOverrides.clear()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.updateGUIFromParameterNode()

    def onSceneEndImport(self, caller, event):
        self.logic.restoreFromScene()  # a loaded scene brings its own panel state and last job
        self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ engine-derived widgets
    def populateFromEngine(self, refresh=False):
        """Methods, presets and devices as the engine describes them (a short trainer process, cached). A
        failure is shown in the panel, never raised: setup() must complete."""
        ok, text = self.logic.dependencyStatus()
        self.ui.dependencyStatusLabel.text = text
        self.ui.installDependenciesButton.visible = not ok
        combos = (self.ui.methodComboBox, self.ui.presetComboBox, self.ui.deviceComboBox)
        for combo in combos:
            combo.blockSignals(True)
        try:
            self.ui.methodComboBox.clear()
            self.methodInfos = {}
            if not ok:
                self.ui.methodComboBox.addItem(_tr("(install PyTorch first)"), "")
                return
            try:
                catalog = self.logic.catalog(refresh=refresh)
            except Exception as e:  # noqa: BLE001 - shown in the panel, with a button to try again
                self.ui.dependencyStatusLabel.text = _tr("The SemiSeg engine could not start: ") + str(e)
                self.ui.methodComboBox.addItem(_tr("(engine unavailable)"), "")
                return
            self.methodInfos = {m.name: m for m in catalog.methods(3)}
            for m in self.methodInfos.values():
                self.ui.methodComboBox.addItem(m.name, m.name)
                self.ui.methodComboBox.setItemData(self.ui.methodComboBox.count - 1, m.description, 3)  # tooltip
            self.ui.presetComboBox.clear()
            self.ui.presetComboBox.addItem(_tr("generic (by dimension)"), "")
            for p in catalog.presets:
                self.ui.presetComboBox.addItem(p, p)
            self.ui.deviceComboBox.clear()
            for value, label in catalog.devices["choices"]:
                self.ui.deviceComboBox.addItem(label, value)
            self.ui.deviceInfoLabel.text = self.logic.deviceSummary()
        finally:
            for combo in combos:
                combo.blockSignals(False)

    def onMethodChanged(self, *_):
        """Description and the Advanced options of the chosen method, with the paper's defaults for the
        chosen preset/dimension; the user's saved changes are shown again."""
        import qt
        from SemiSegSlicerLib import optionform
        name = self.ui.methodComboBox.currentData
        if self._updatingGUI or not name or not self.methodInfos:
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
        self.optionRows = optionform.add_rows(qt, form, info.options)
        form.addRow(qt.QLabel("<b>" + _tr("Training (all methods)") + "</b>"))
        self.trainingRows = optionform.add_rows(qt, form, self.logic.trainingOptions(name, dim, preset))
        state = self.logic.panelState()
        if state.method == name:
            optionform.restore(self.optionRows, state.method_options)
        optionform.restore(self.trainingRows, state.training_options)
        for row in list(self.optionRows.values()) + list(self.trainingRows.values()):
            row.widget.connect(optionform.change_signal(row.option.kind), self.updateParameterNodeFromGUI)
        self.ui.methodOptionsFrame.layout().addWidget(self.optionsContainer)
        defaults = self.logic.resolvedDefaults(name, dim, preset)
        for box, key in ((self.ui.iterationsSpinBox, "iterations"), (self.ui.labeledBatchSpinBox, "labeled_batch"),
                         (self.ui.unlabeledBatchSpinBox, "unlabeled_batch")):
            box.specialValueText = _tr("preset default") + (f" ({defaults[key]})" if key in defaults else "")
        self.updateParameterNodeFromGUI()

    def methodOptions(self) -> dict:
        from SemiSegSlicerLib import optionform
        return optionform.changed(self.optionRows)

    def trainingOptions(self) -> dict:
        from SemiSegSlicerLib import optionform
        return optionform.changed(self.trainingRows)

    # ------------------------------------------------------------------ parameter node <-> panel
    def updateGUIFromParameterNode(self, *_):
        """Show the scene's panel state (saved with the scene; restored when a scene is loaded)."""
        import qt
        state = self.logic.panelState()
        self._updatingGUI = True
        try:
            scene = slicer.mrmlScene
            for combo, ids in ((self.ui.labeledSegmentationsComboBox, state.labeled),
                               (self.ui.unlabeledVolumesComboBox, state.unlabeled),
                               (self.ui.segmentVolumesComboBox, state.to_segment)):
                for node in combo.checkedNodes():
                    combo.setCheckState(node, qt.Qt.Unchecked)
                for node_id in ids:
                    node = scene.GetNodeByID(node_id)
                    if node is not None:
                        combo.setCheckState(node, qt.Qt.Checked)
            self.sourceOverrides = dict(state.source_overrides)
            for combo, value in ((self.ui.methodComboBox, state.method), (self.ui.dimensionComboBox, state.dim),
                                 (self.ui.presetComboBox, state.preset), (self.ui.deviceComboBox, state.device)):
                index = combo.findData(value)
                if index >= 0:
                    combo.setCurrentIndex(index)
            for box, value in ((self.ui.iterationsSpinBox, state.iterations),
                               (self.ui.labeledBatchSpinBox, state.labeled_batch),
                               (self.ui.unlabeledBatchSpinBox, state.unlabeled_batch),
                               (self.ui.validationCasesSpinBox, state.validation_cases),
                               (self.ui.timeBudgetSpinBox, state.time_budget_minutes),
                               (self.ui.keepJobsSpinBox, state.keep_jobs)):
                box.value = value
            self.ui.allowMissingClassesCheckBox.checked = state.allow_missing_classes
            self.ui.show3DCheckBox.checked = state.show_3d
            self.ui.workspacePathLineEdit.currentPath = str(self.logic.workspace)
        finally:
            self._updatingGUI = False
        self.onMethodChanged()
        self.updateInputs()

    def updateParameterNodeFromGUI(self, *_):
        if self._updatingGUI or self.logic is None:
            return
        from SemiSegSlicerLib import parameters
        state = self.logic.panelState()
        self.logic.savePanelState(parameters.PanelState(
            labeled=[n.GetID() for n in self.ui.labeledSegmentationsComboBox.checkedNodes()],
            unlabeled=[n.GetID() for n in self.ui.unlabeledVolumesComboBox.checkedNodes()],
            to_segment=[n.GetID() for n in self.ui.segmentVolumesComboBox.checkedNodes()],
            source_overrides=dict(self.sourceOverrides),
            method=self.ui.methodComboBox.currentData or state.method,
            dim=int(self.ui.dimensionComboBox.currentData or 3), preset=self.ui.presetComboBox.currentData or "",
            iterations=self.ui.iterationsSpinBox.value, labeled_batch=self.ui.labeledBatchSpinBox.value,
            unlabeled_batch=self.ui.unlabeledBatchSpinBox.value,
            validation_cases=self.ui.validationCasesSpinBox.value,
            time_budget_minutes=self.ui.timeBudgetSpinBox.value,
            device=self.ui.deviceComboBox.currentData or "auto",
            allow_missing_classes=self.ui.allowMissingClassesCheckBox.checked,
            show_3d=self.ui.show3DCheckBox.checked,
            method_options=self.methodOptions(), training_options=self.trainingOptions(),
            workspace=str(self.logic.workspace), last_training_job=state.last_training_job, model=state.model,
            keep_jobs=self.ui.keepJobsSpinBox.value))

    # ------------------------------------------------------------------ inputs
    def labeledPairs(self):
        return self.logic.pairCases(self.ui.labeledSegmentationsComboBox.checkedNodes(), self.sourceOverrides)

    def updateInputs(self, *_):
        import qt
        if self._updatingGUI:
            return
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
        self.updateParameterNodeFromGUI()
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
        if path and not self._updatingGUI:
            self.logic.setWorkspace(path)
            self.updateParameterNodeFromGUI()

    # ------------------------------------------------------------------ actions
    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay(_tr("Installing SemiSeg's dependencies failed."), waitCursor=True):
            self.logic.setupDependencies(ask=True)
        self.populateFromEngine(refresh=True)
        self.onMethodChanged()

    def onRefreshEngine(self):
        self.populateFromEngine(refresh=True)
        self.updateGUIFromParameterNode()

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
                timeBudgetMinutes=self.ui.timeBudgetSpinBox.value,
                extraConfig=self.trainingOptions(), waitForCompletion=False)
            self.logic.showPlot()
        self.updateButtons()

    def onResumeButton(self):
        with slicer.util.tryWithErrorDisplay(_tr("Training could not resume."), waitCursor=True):
            self.logic.resume(waitForCompletion=False)
            self.logic.showPlot()
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
                               show3D=self.ui.show3DCheckBox.checked, uncertainty=self.uncertaintyMap(),
                               waitForCompletion=False)
        self.updateButtons()

    def uncertaintyMap(self):
        """The map "Segment" adds when asked: the one "Rank by" names (entropy for random), so the map shown is
        what the ranking scores; False when the uncertainty box is unchecked."""
        if not self.ui.uncertaintyCheckBox.checked:
            return False
        strategy = self.ui.suggestStrategyComboBox.currentData
        return strategy if strategy and strategy != "random" else "entropy"

    def onSaveModel(self):
        with slicer.util.tryWithErrorDisplay(_tr("The model could not be saved."), waitCursor=True):
            folder = self.logic.saveModel()
            self.log(_tr("Model saved: ") + str(folder))
        self.updateButtons()

    def onLoadModel(self):
        with slicer.util.tryWithErrorDisplay(_tr("The model could not be loaded."), waitCursor=True):
            self.logic.loadModel(self.ui.modelPathLineEdit.currentPath)
        self.updateButtons()

    def onCleanUpJobs(self):
        with slicer.util.tryWithErrorDisplay(_tr("Cleaning up the job folders failed."), waitCursor=True):
            removed = self.logic.cleanUpJobs(self.ui.keepJobsSpinBox.value)
            self.log(_tr("Deleted job folders: ") + str(len(removed)))
        self.updateButtons()

    def onSuggestButton(self):
        with slicer.util.tryWithErrorDisplay(_tr("Ranking the unlabeled volumes could not start."), waitCursor=True):
            self.logic.suggestNext(self.ui.unlabeledVolumesComboBox.checkedNodes(), n=1,
                                   strategy=self.ui.suggestStrategyComboBox.currentData,
                                   device=self.ui.deviceComboBox.currentData or "auto", waitForCompletion=False)
        self.updateButtons()

    def onAddToLabeled(self):
        with slicer.util.tryWithErrorDisplay(_tr("The segmentation could not join the labeled cases."), waitCursor=True):
            seg, volume = self.logic.addToLabeled(self.ui.correctedSegmentationComboBox.currentNode())
            self.log(_tr("Labeled case added: ") + f"{seg.GetName()} ({volume.GetName()})")
        self.updateGUIFromParameterNode()

    def onRetrainButton(self):
        with slicer.util.tryWithErrorDisplay(_tr("Retraining could not start."), waitCursor=True):
            self.ui.logPlainTextEdit.clear()
            self.logic.retrain(self.labeledPairs(), unlabeled=self.ui.unlabeledVolumesComboBox.checkedNodes(),
                               iterations=self.ui.iterationsSpinBox.value,
                               device=self.ui.deviceComboBox.currentData or "auto",
                               extraConfig=self.trainingOptions(), waitForCompletion=False)
            self.logic.showPlot()
        self.updateButtons()

    def onLoadVersion(self):
        with slicer.util.tryWithErrorDisplay(_tr("The version could not be loaded."), waitCursor=True):
            self.logic.loadModel(self.ui.versionsComboBox.currentData)
        self.updateButtons()

    def onShowPlot(self):
        self.logic.showPlot()

    # ------------------------------------------------------------------ job feedback
    def onJobEvent(self, progress, event):
        from SemiSegSlicerLib import mainloop
        self.ui.progressBar.value = int(round(100 * progress.fraction))
        self.ui.progressBar.format = mainloop.progress_bar_format(progress.status_text())
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
        for node, score in zip(getattr(result, "uncertaintyNodes", []), getattr(result, "uncertaintyScores", [])):
            self.log(f"{node.GetName()}: score {score:.3f}")
        if getattr(result, "uncertaintyNodes", None):
            slicer.util.setSliceViewerLayers(foreground=result.uncertaintyNodes[-1], foregroundOpacity=0.4)
        ranking = getattr(result, "ranking", None)
        if ranking:
            best = ranking[0]
            self.ui.suggestionLabel.text = (_tr("Label next: ") + f"{best['node'].GetName()} (score {best['score']:.3f}, "
                                            + _tr("most uncertain slice ") + f"{best['slice']})")
            self.logic.showSuggestion(best)
            self.ui.correctedSegmentationComboBox.setCurrentNode(None)
        self.updateButtons()

    def log(self, text):
        self.ui.logPlainTextEdit.appendPlainText(str(text))

    def updateButtons(self, *_):
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
        has_model = not running and self.logic.model is not None
        self.ui.suggestButton.enabled = has_model and bool(self.ui.unlabeledVolumesComboBox.checkedNodes())
        self.ui.addToLabeledButton.enabled = has_model and self.ui.correctedSegmentationComboBox.currentNode() is not None
        self.ui.retrainButton.enabled = has_model and bool(self.ui.labeledSegmentationsComboBox.checkedNodes())
        self.ui.versionsComboBox.clear()
        for v in self.logic.modelVersions():
            dice = f", Dice {100 * v['best_val_dice']:.1f}%" if v.get("best_val_dice") else ""
            self.ui.versionsComboBox.addItem(f"v{v['version']}: {v['labeled_cases']} labeled{dice}", v["folder"])
        self.ui.loadVersionButton.enabled = not running and self.ui.versionsComboBox.count > 0
        if not running:
            self.ui.progressBar.format = "%p%"


#
# SemiSegLogic
#
class SemiSegLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from scripts and tests without the widget.

    ``train(...)`` and ``segment(...)`` block by default (``waitForCompletion=True``, for scripts) and
    return the job's result; with ``waitForCompletion=False`` they return at once and report through
    ``progressCallback(progress, event)``, ``logCallback(text)`` and ``finishedCallback(result)``, called
    on the main thread from a ``qt.QTimer`` (SemiSegSlicerLib.mainloop). One job at a time.

    Slicer's own process never imports torch: what the engine offers (methods, options, devices) comes
    from a short trainer process (``semiseg catalog``), cached in the workspace.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        import qt
        settings = qt.QSettings()
        self.workspace = Path(settings.value("SemiSeg/Workspace", str(Path.home() / "SemiSeg")))
        self.runner = None
        self.poller = None
        self.task = ""
        self.jobDir: Path | None = None
        self.lastTrainingJob: Path | None = None
        self.model: dict | None = None          # metadata of the current (trained or loaded) model
        self.plot = None
        self.lastSegmentations = []
        self._catalog = None
        self._observers: list[tuple] = []
        self._callbacks = (None, None, None)
        self._segmentOptions = {}
        self._retrainLineage = None   # set while a retrain runs: its model becomes the lineage's next version
        self.restoreFromScene()

    def setWorkspace(self, path):
        """Folder for job folders (jobs/) and saved models (models/); remembered in the settings and the scene."""
        import qt
        self.workspace = Path(path)
        qt.QSettings().setValue("SemiSeg/Workspace", str(self.workspace))
        self._updateState(workspace=str(self.workspace))

    # ------------------------------------------------------------------ parameter node (state in the scene)
    def getParameterNode(self):
        from SemiSegSlicerLib import parameters
        return parameters.parameter_node(slicer.mrmlScene)

    def panelState(self):
        from SemiSegSlicerLib import parameters
        return parameters.load(self.getParameterNode())

    def savePanelState(self, state) -> None:
        from SemiSegSlicerLib import parameters
        parameters.save(self.getParameterNode(), state)

    def _updateState(self, **changes) -> None:
        import dataclasses
        self.savePanelState(dataclasses.replace(self.panelState(), **changes))

    def restoreFromScene(self) -> None:
        """Workspace, last training job (Resume) and model as saved in the scene's parameter node."""
        state = self.panelState()
        if state.workspace:
            self.workspace = Path(state.workspace)
        job = Path(state.last_training_job) if state.last_training_job else None
        self.lastTrainingJob = job if job is not None and job.is_dir() else None
        self.model = None
        if state.model and Path(state.model).exists():
            try:
                self.loadModel(state.model)
            except Exception as e:  # noqa: BLE001 - a moved or deleted model: the panel shows "no model"
                logging.info("SemiSeg: the scene's model %s cannot be loaded: %s", state.model, e)

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

    def catalog(self, refresh: bool = False):
        """The engine's methods, options, presets and devices (``semiseg catalog`` in a child process, cached
        on disk per Python/torch/engine version)."""
        from SemiSegSlicerLib import catalog, process
        if self._catalog is None or refresh:
            command = process.trainer_module_command(["catalog"], self.pythonExecutable())
            self._catalog = catalog.load(Path(self.workspace) / "cache", command, process.trainer_environment(),
                                         process.package_roots(), refresh=refresh,
                                         creationflags=process.no_window_flags())
        return self._catalog

    def methods(self, dim: int = 3, preset: str = ""):
        return self.catalog().methods(dim, preset)

    def presets(self):
        return self.catalog().presets

    def resolvedDefaults(self, method, dim=3, preset="") -> dict:
        """The configuration a method/dimension/preset trains with when nothing else is set ({} if invalid)."""
        return self.catalog().resolved(method, dim, preset)

    def trainingOptions(self, method, dim=3, preset=""):
        """The shared training options (TrainConfig fields) with the values this method/preset uses."""
        return self.catalog().training_options(method, dim, preset)

    def deviceInfo(self) -> dict:
        return self.catalog().devices

    def deviceSummary(self) -> str:
        from semiseg import devices
        return devices.summary(self.deviceInfo())

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
        from SemiSegSlicerLib import segment_classes
        return segment_classes.collect_classes(segmentationNodes, allow_missing=allowMissingClasses)

    # ------------------------------------------------------------------ jobs
    @property
    def isRunning(self) -> bool:
        return self.runner is not None and self.runner.running

    @property
    def cancelRequested(self) -> bool:
        return bool(self.runner and self.runner.cancel_requested)

    def newJobDir(self, kind: str) -> Path:
        from SemiSegSlicerLib import jobs
        return jobs.new_job_dir(self.workspace, kind)

    def cleanUpJobs(self, keep: int | None = None) -> list:
        """Delete all but the newest ``keep`` job folders (default: the panel's setting), never the running
        job, the last training job (Resume, Save model) or the job of the loaded model."""
        from SemiSegSlicerLib import jobs
        keep = self.panelState().keep_jobs if keep is None else int(keep)
        protect = [self.jobDir if self.isRunning else None, self.lastTrainingJob,
                   (self.model or {}).get("checkpoint")]
        return jobs.cleanup(self.workspace, keep, protect)

    def train(self, labeled, unlabeled=(), method="mean_teacher", dim=3, preset="", iterations=0, labeledBatch=0,
              unlabeledBatch=0, patchSize=(), device="auto", methodOptions=None, validationCases=0, valEvery=None,
              allowMissingClasses=False, timeBudgetMinutes=0, extraConfig=None, waitForCompletion=True,
              progressCallback=None, logCallback=None, finishedCallback=None, timeout=None):
        """Export the cases, write the job, start the trainer. ``labeled``: segmentation nodes (source volume
        from the reference-geometry link) or (segmentation, volume) pairs. ``timeBudgetMinutes``: train for
        that long (the schedule is fitted to it); 0 = by iterations."""
        from SemiSegSlicerLib import catalog, mrml_export, plotting
        from semiseg_trainer import protocol
        self._refuseConcurrent()
        if self._catalog is not None:  # an impossible combination fails here, with the engine's one line
            error = self._catalog.recipe(method, dim, preset).get("error")
            if error:
                raise ValueError(error)
        pairs = [tuple(p) if isinstance(p, (tuple, list)) else self.pairCases([p])[0] for p in labeled]
        job = self.newJobDir("train")
        try:
            export = mrml_export.export_training_data(slicer.mrmlScene, job, pairs, list(unlabeled),
                                                      validation_cases=validationCases,
                                                      allow_missing_classes=allowMissingClasses)
        except Exception:
            logging.info("SemiSeg: export failed; job folder kept: %s", job)
            raise
        extra = dict(extraConfig or {})
        if timeBudgetMinutes:
            extra["time_budget"] = f"{int(timeBudgetMinutes)}m"
        config = catalog.training_config(method, dim, preset, iterations, labeledBatch, unlabeledBatch, patchSize,
                                         device, val_every=valEvery if valEvery is not None else
                                         (None if validationCases else 0), method_options=methodOptions,
                                         extra=extra)
        protocol.write_job(job, mrml_export.training_job_spec(export, config))
        for w in export.warnings:
            self._log(f"note: {w}", logCallback)
        self._log(f"training job {job}: {export.summary()}", logCallback)
        self.lastTrainingJob = job
        self._updateState(last_training_job=str(job))
        self.plot = plotting.TrainingPlot(slicer.mrmlScene, f"SemiSeg {method}").create()
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
        self._updateState(last_training_job=str(job))
        if self.plot is None:
            self.plot = plotting.TrainingPlot(slicer.mrmlScene, f"SemiSeg {spec['config'].get('method', '')}").create()
        device = spec.get("config", {}).get("device", "auto")
        return self._start("train", job, device, waitForCompletion, progressCallback, logCallback, finishedCallback, timeout)

    def segment(self, volumes, model=None, device="auto", show3D=False, uncertainty=False, waitForCompletion=True,
                progressCallback=None, logCallback=None, finishedCallback=None, timeout=None):
        """Segment volume nodes with ``model`` (a saved model folder/file) or the current model. Blocking:
        returns the new segmentation nodes (``"<volume> SemiSeg"``). ``uncertainty``: also load each volume's
        voxel uncertainty map (``"<volume> SemiSeg uncertainty"``, in ``result.uncertaintyNodes``; scores in
        ``result.uncertaintyScores``): True for the entropy map, or the map's name (entropy, margin,
        teacher-disagreement, mc-dropout)."""
        from SemiSegSlicerLib import mrml_export
        from semiseg_trainer import protocol
        self._refuseConcurrent()
        if model is not None:
            self.loadModel(model)
        if self.model is None:
            raise ValueError("no model: train one, or load a saved model")
        job = self.newJobDir("segment")
        inputs = mrml_export.export_segment_inputs(job, list(volumes))
        spec = mrml_export.segment_job_spec(inputs, self.model["checkpoint"], device)
        if uncertainty:
            spec["uncertainty"] = uncertainty if isinstance(uncertainty, str) else True
        protocol.write_job(job, spec)
        self._segmentOptions = {"show3D": show3D}
        result = self._start("segment", job, device, waitForCompletion, progressCallback, logCallback,
                             finishedCallback, timeout)
        return getattr(result, "nodes", None) if waitForCompletion else None

    # ------------------------------------------------------------------ the labeling loop
    def suggestNext(self, volumes, n=1, strategy="entropy", model=None, device="auto", waitForCompletion=True,
                    progressCallback=None, logCallback=None, finishedCallback=None, timeout=None):
        """Rank unlabeled volume nodes by how much labeling them would teach the model (``strategy``: entropy,
        margin, teacher-disagreement or random; the ``n`` picks are kept diverse). Blocking: returns the
        ranking, best first: ``[{"node", "score", "picked", "slice", "ras"}]`` (``ras``: the centre of the
        volume's most uncertain slice); also ``result.ranking`` for ``finishedCallback``."""
        from SemiSegSlicerLib import mrml_export
        from semiseg_trainer import protocol
        self._refuseConcurrent()
        if model is not None:
            self.loadModel(model)
        if self.model is None:
            raise ValueError("no model: train one, or load a saved model")
        if not volumes:
            raise ValueError("no unlabeled volume to rank: check the unlabeled volumes")
        job = self.newJobDir("suggest")
        inputs = mrml_export.export_segment_inputs(job, list(volumes))
        spec = mrml_export.segment_job_spec(inputs, self.model["checkpoint"], device)
        spec.update(task="suggest", n=int(n), strategy=strategy)
        protocol.write_job(job, spec)
        result = self._start("suggest", job, device, waitForCompletion, progressCallback, logCallback,
                             finishedCallback, timeout)
        return getattr(result, "ranking", None) if waitForCompletion else None

    def showSuggestion(self, entry) -> None:
        """Show a ranked volume in the slice views at its most uncertain slice (Slicer only)."""
        slicer.util.setSliceViewerLayers(background=entry["node"], fit=True)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *entry["ras"])

    def addToLabeled(self, segmentationNode, volumeNode=None):
        """A corrected segmentation (e.g. a SemiSeg result edited in the Segment Editor) joins the labeled cases:
        its segments must be classes of the current model and take their names, colours and terminology; its
        volume leaves the unlabeled and to-segment lists. Returns the (segmentation, volume) pair."""
        from SemiSegSlicerLib import labeling
        if self.model is None:
            raise ValueError("no model: the classes of a corrected segmentation are checked against the model's")
        labeling.adopt_classes(segmentationNode, self.model.get("classes", []))
        (pair,) = self.pairCases([segmentationNode], {segmentationNode.GetID(): volumeNode.GetID()} if volumeNode else None)
        state = self.panelState()
        if segmentationNode.GetID() not in state.labeled:
            state.labeled.append(segmentationNode.GetID())
        if volumeNode is not None:
            state.source_overrides[segmentationNode.GetID()] = volumeNode.GetID()
        volumeId = pair[1].GetID()
        state.unlabeled = [v for v in state.unlabeled if v != volumeId]
        state.to_segment = [v for v in state.to_segment if v != volumeId]
        self.savePanelState(state)
        return pair

    def retrain(self, labeled, unlabeled=(), iterations=0, device="auto", extraConfig=None, **kwargs):
        """Train again from the current model (warm start: its weights and EMA teacher, a fresh optimiser and
        the engine's shorter ``finetune`` schedule unless ``iterations`` is given) on the labeled cases as they
        are now. The model it starts from is kept; the new model is saved as the next version of its lineage
        (``WORKSPACE/models/<lineage>/vN``). Other arguments as :meth:`train`."""
        from SemiSegSlicerLib import models
        if self.model is None:
            raise ValueError("no model to start from: train one, or load a saved model")
        source = self.model
        config = source.get("config", {})
        lineage = models.lineage_of(source)
        if lineage is None:  # the first retrain of a model: it becomes v1 of a new lineage, and starts from there
            job = Path(source.get("source_job", ""))
            lineage = Path(self.workspace) / "models" / (job.name or Path(source["checkpoint"]).parent.name)
            existing = models.versions(lineage)
            source = existing[-1] if existing else models.load_model_info(models.save_version(job, lineage))
            config = source.get("config", config)
        self._retrainLineage = lineage
        try:
            return self.train(labeled, unlabeled, method=config.get("method", "mean_teacher"),
                              dim=int(config.get("dim") or 3), iterations=iterations, device=device,
                              extraConfig={**(extraConfig or {}), "init_from": source["checkpoint"]}, **kwargs)
        except Exception:
            if not self.isRunning:
                self._retrainLineage = None  # nothing started: the next training is not a version
            raise

    def modelVersions(self) -> list:
        """The versions of the current model's lineage (v1, v2, ...) with validation Dice and labeled-case
        count; [] when the model is not a saved version."""
        from SemiSegSlicerLib import models
        lineage = models.lineage_of(self.model or {})
        return models.versions(lineage) if lineage else []

    def cancel(self):
        """Graceful: the trainer checkpoints and exits; its process tree is killed after a grace period."""
        if self.isRunning:
            self.runner.cancel()

    def sceneAboutToClose(self) -> str:
        """Closing the scene: a training job does not depend on the scene (its data are exported) and keeps
        running; a segmentation job would load its results into the closed scene, so it is cancelled.
        Returns what was done, for the log ("" when nothing runs)."""
        if not self.isRunning:
            return ""
        if self.task == "segment":
            self.cancel()
            return "Scene closed: the segmentation job is cancelled (its results had nowhere to go)."
        self.plot = None  # its nodes go with the scene; a new plot is made in the next scene when shown
        return "Scene closed: training goes on in the background (job folder: %s)." % self.jobDir

    def shutdown(self, grace: float = 5.0):
        """Module cleanup / application exit: ask to stop, wait a little, then kill the process tree."""
        if self.poller is not None:
            self.poller.stop()
        if self.isRunning:
            self.runner.cancel(grace_seconds=grace)
            if self.runner.wait(timeout=grace) is None:
                self.runner.kill()

    def _refuseConcurrent(self):
        if self.isRunning:
            raise RuntimeError(f"a {self.task} job is already running ({self.jobDir}); cancel it first")

    def _start(self, task, job, device, wait, progressCallback, logCallback, finishedCallback, timeout):
        from SemiSegSlicerLib import mainloop
        from SemiSegSlicerLib.process import JobRunner
        self.task, self.jobDir = task, job
        self._callbacks = (progressCallback, logCallback, finishedCallback)
        self.runner = JobRunner(job, python=self.pythonExecutable(), cpu_only=(device == "cpu"),
                                on_event=self._onEvent, on_log=self._onLog, on_finished=self._onFinished)
        self.runner.start()
        self._log(f"started {task} job: {job}", None)
        try:
            self.cleanUpJobs()  # retention: the running job is protected
        except OSError as e:
            logging.info("SemiSeg: job folder clean-up skipped: %s", e)
        if not wait:
            runner = self.runner

            def tick():
                runner.poll()
                return runner.running
            self.poller = mainloop.MainThreadPoller(tick).start()
            return None
        result = self.runner.wait(timeout=timeout, between=mainloop.process_events)
        if result is None:
            self.runner.kill()
            result = self.runner.wait(timeout=30, between=mainloop.process_events)
        if result is not None and result.status == "failed":
            raise RuntimeError(f"SemiSeg {task} failed: {result.message} (job folder: {job})")
        return result

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
        from SemiSegSlicerLib import labeling, models, mrml_import
        result.nodes, result.uncertaintyNodes, result.uncertaintyScores, result.ranking = [], [], [], []
        try:
            if result.ok and self.task == "train":
                lineage, self._retrainLineage = self._retrainLineage, None
                if lineage is not None:  # a retrain: the new model is the lineage's next version
                    version = models.save_version(result.job_dir, lineage)
                    self.model = models.load_model_info(version)
                    self._updateState(model=str(version))
                else:
                    self.model = models.job_model_info(result.job_dir)
                    self._updateState(model=str(result.job_dir))  # reloads from the job's JSON files, no torch
            elif result.ok and self.task == "segment":
                result.nodes = mrml_import.import_job_predictions(
                    slicer.mrmlScene, result.job_dir, classes=self.model.get("classes") if self.model else None,
                    show3d=self._segmentOptions.get("show3D", False))
                self.lastSegmentations = result.nodes
                result.uncertaintyNodes, result.uncertaintyScores = labeling.import_job_uncertainty(
                    slicer.mrmlScene, result.job_dir)
            elif result.ok and self.task == "suggest":
                result.ranking = labeling.job_ranking(slicer.mrmlScene, result.job_dir)
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
        if kind == "suggested":
            ranking = e.get("ranking", [])
            best = Path(str(ranking[0]["input"])).name if ranking else "-"
            return f"ranked {len(ranking)} volume(s); label next: {best}"
        if kind == "error":
            return f"error: {e.get('message')}"
        return str(e.get("message", e))

    # ------------------------------------------------------------------ models
    def saveModel(self, folder=None) -> Path:
        from SemiSegSlicerLib import models
        if self.lastTrainingJob is None:
            raise ValueError("no trained model to save: train first")
        dest = Path(folder) if folder else Path(self.workspace) / "models" / self.lastTrainingJob.name
        saved = models.save_model(self.lastTrainingJob, dest)
        self.model = models.load_model_info(saved)  # the saved copy survives job clean-up
        self._updateState(model=str(saved))
        return saved

    def loadModel(self, path) -> dict:
        from SemiSegSlicerLib import models
        self.model = models.load_model_info(path)
        self._updateState(model=str(path))
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
        """Show the live plot in the layout; its nodes exist from the start of a training job."""
        from SemiSegSlicerLib import plotting
        if self.plot is None and self.isRunning and self.task == "train":
            self.plot = plotting.TrainingPlot(slicer.mrmlScene, "SemiSeg training").create()
            self.plot.update(self.runner.progress)
        if self.plot is not None and self.plot.chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(self.plot.chart)


#
# SemiSegTest
#
class SemiSegTest(ScriptedLoadableModuleTest):
    """A short CPU run through the logic on a tiny synthetic scene (Slicer's ctest / Self Tests): the blocking
    scripting path, then the panel's non-blocking path with Slicer's real event loop. Skipped with a message
    when PyTorch is not installed (nothing is installed in testing mode)."""

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
        from SemiSegSlicerLib import dependencies, mrml_export, segment_classes
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
        logic.setWorkspace(Path(slicer.app.temporaryPath) / "SemiSegTest")
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
        names = [s.GetName() for _, s in segment_classes.segments_of(node)]
        self.assertEqual(names, ["disk"])
        for got, want in zip(segment_classes.segments_of(node)[0][1].GetColor(), (0.9, 0.2, 0.2)):
            self.assertAlmostEqual(got, want, places=5)
        self.assertIs(mrml_export.source_volume(node), unlabeled[0])

        # the panel's path: nothing blocks; results arrive while Slicer processes events
        import time
        finished = []
        logic.segment([unlabeled[1]], device="cpu", waitForCompletion=False, finishedCallback=finished.append)
        deadline = time.monotonic() + 300
        while not finished and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(finished, "the segmentation job did not report back within 5 minutes")
        self.assertEqual(finished[0].status, "completed", finished[0].message)
        self.assertEqual([n.GetName() for n in finished[0].nodes], ["unlabeled 2 SemiSeg"])
        self.assertEqual(logic.panelState().last_training_job, str(logic.lastTrainingJob))
        self.delayDisplay("SemiSeg test passed")
