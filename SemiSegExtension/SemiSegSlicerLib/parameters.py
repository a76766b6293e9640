"""The panel's state kept in the scene: the module's parameter node (the scene's singleton
``vtkMRMLScriptedModuleNode`` tagged with the module name, the node Slicer's
``ScriptedLoadableModuleLogic.getParameterNode()`` returns), so that saving and reopening a scene
restores the panel's inputs and choices, the last training job (Resume after a restart) and the model.

Typed fields (:class:`PanelState`) map onto the node as Slicer's ``parameterNodeWrapper`` does: scalars
as string parameters, node lists as node references (so they follow node-ID changes when a scene is
imported). Written against an explicit scene, without Qt, so it runs on real MRML outside Slicer.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

MODULE_NAME = "SemiSeg"

# node-reference roles (several nodes per role, in order)
LABELED = "labeledSegmentation"
UNLABELED = "unlabeledVolume"
TO_SEGMENT = "segmentVolume"
OVERRIDE_SEGMENTATION = "sourceOverrideSegmentation"   # with OVERRIDE_VOLUME, pairwise by index
OVERRIDE_VOLUME = "sourceOverrideVolume"
NODE_ROLES = (LABELED, UNLABELED, TO_SEGMENT, OVERRIDE_SEGMENTATION, OVERRIDE_VOLUME)


@dataclass
class PanelState:
    """Everything the panel shows that a user chose, plus the jobs it refers to."""
    labeled: list[str] = field(default_factory=list)          # segmentation node IDs
    unlabeled: list[str] = field(default_factory=list)        # volume node IDs
    to_segment: list[str] = field(default_factory=list)       # volume node IDs
    source_overrides: dict[str, str] = field(default_factory=dict)  # segmentation ID -> volume ID
    method: str = "mean_teacher"
    dim: int = 3
    preset: str = ""
    iterations: int = 0
    labeled_batch: int = 0
    unlabeled_batch: int = 0
    validation_cases: int = 0
    time_budget_minutes: int = 0
    device: str = "auto"
    allow_missing_classes: bool = False
    show_3d: bool = False
    method_options: dict = field(default_factory=dict)        # only what the user changed
    training_options: dict = field(default_factory=dict)      # only what the user changed
    workspace: str = ""
    last_training_job: str = ""
    model: str = ""                                           # checkpoint or saved-model folder
    keep_jobs: int = 20


_SCALARS = [f for f in dataclasses.fields(PanelState)
            if f.name not in ("labeled", "unlabeled", "to_segment", "source_overrides")]


def _parameter_name(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))  # method_options -> MethodOptions


def parameter_node(scene, module_name: str = MODULE_NAME):
    """The module's singleton parameter node in ``scene``, created as Slicer's
    ``ScriptedLoadableModuleLogic.createParameterNode`` does when missing."""
    node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass hands over a reference; the scene keeps its own
        node.SetSingletonTag(module_name)
        node.SetAttribute("ModuleName", module_name)
        node.SetName(scene.GenerateUniqueName(module_name))
        node = scene.AddNode(node)
    return node


def save(node, state: PanelState) -> None:
    """Write ``state`` into the parameter node (one Modified event)."""
    was = node.StartModify()
    try:
        for f in _SCALARS:
            value = getattr(state, f.name)
            text = json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)
            node.SetParameter(_parameter_name(f.name), text)
        overrides = list(state.source_overrides.items())
        lists = {LABELED: state.labeled, UNLABELED: state.unlabeled, TO_SEGMENT: state.to_segment,
                 OVERRIDE_SEGMENTATION: [s for s, _ in overrides], OVERRIDE_VOLUME: [v for _, v in overrides]}
        for role, ids in lists.items():
            node.RemoveNodeReferenceIDs(role)
            for node_id in ids:
                node.AddNodeReferenceID(role, node_id)
    finally:
        node.EndModify(was)


def load(node) -> PanelState:
    """The state stored in the parameter node (defaults for what is missing or unreadable)."""
    state = PanelState()
    for f in _SCALARS:
        text = node.GetParameter(_parameter_name(f.name))
        if not text:
            continue
        default = getattr(state, f.name)
        try:
            if isinstance(default, (dict, list, bool)):
                value = json.loads(text)
            else:
                value = type(default)(text)
        except (ValueError, TypeError):
            continue  # a value from another version of the module: keep the default
        setattr(state, f.name, value)

    def ids(role):
        out = []
        for i in range(node.GetNumberOfNodeReferences(role)):
            ref = node.GetNthNodeReferenceID(role, i)
            if ref:
                out.append(ref)
        return out
    state.labeled, state.unlabeled, state.to_segment = ids(LABELED), ids(UNLABELED), ids(TO_SEGMENT)
    state.source_overrides = dict(zip(ids(OVERRIDE_SEGMENTATION), ids(OVERRIDE_VOLUME)))
    return state
