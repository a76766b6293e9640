"""The training classes of a set of segmentation nodes: segments matched by name across cases, one value per
class, colour and terminology of the first occurrence, and what blocks training (a class missing from a case,
duplicate names). No Qt; every function takes the nodes explicitly, so it runs on real MRML outside Slicer."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClassEntry:
    value: int
    name: str
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    terminology: str = ""

    def to_dict(self) -> dict:
        d = {"value": int(self.value), "name": self.name, "color": [float(c) for c in self.color]}
        if self.terminology:
            d["terminology"] = self.terminology
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassEntry":
        return cls(int(d["value"]), str(d["name"]), tuple(float(c) for c in d.get("color", (0.5, 0.5, 0.5))[:3]),
                   str(d.get("terminology", "") or ""))


@dataclass
class ClassTable:
    classes: list[ClassEntry]
    problems: list[str] = field(default_factory=list)   # cases disagree: training would be wrong
    warnings: list[str] = field(default_factory=list)   # worth telling, not blocking

    def describe(self) -> str:
        lines = [f"{c.value}: {c.name}" + (f"  [{terminology_label(c.terminology)}]" if c.terminology else "")
                 for c in self.classes] or ["(no classes)"]
        lines += [f"problem: {p}" for p in self.problems] + [f"note: {w}" for w in self.warnings]
        return "\n".join(lines)

    def html(self) -> str:
        """The same for a rich-text label: a colour swatch per class, problems in red."""
        import html
        rows = []
        for c in self.classes:
            rgb = "#%02x%02x%02x" % tuple(int(round(255 * max(0.0, min(1.0, v)))) for v in c.color)
            term = f" <i>({html.escape(terminology_label(c.terminology))})</i>" if c.terminology else ""
            rows.append(f'<span style="color:{rgb}">&#9632;</span> {c.value}: {html.escape(c.name)}{term}')
        rows += [f'<span style="color:#c0392b">&#9888; {html.escape(p)}</span>' for p in self.problems]
        rows += [f'<span style="color:#b9770e">{html.escape(w)}</span>' for w in self.warnings]
        return "<br>".join(rows) or "<i>no segmentation checked</i>"


def class_key(name: str) -> str:
    """Segments match a class when their names are equal ignoring case and repeated spaces."""
    return " ".join(str(name).split()).lower()


def terminology_label(entry: str) -> str:
    """Human-readable type of a Slicer terminology entry string (``…~SCT^10200004^Liver~…`` → Liver)."""
    parts = entry.split("~")
    if len(parts) >= 3:
        codes = parts[2].split("^")
        if len(codes) >= 3 and codes[2]:
            return codes[2]
    return entry


def segments_of(seg_node) -> list[tuple[str, object]]:
    """(segment ID, vtkSegment) in the segmentation's display order."""
    s = seg_node.GetSegmentation()
    return [(s.GetNthSegmentID(i), s.GetNthSegment(i)) for i in range(s.GetNumberOfSegments())]


def segment_terminology(segment) -> str:
    """The segment's terminology entry string ("" if none); ``GetTerminology`` exists since Slicer 5.4,
    the tag with an out-parameter before."""
    if hasattr(segment, "GetTerminology"):
        return str(segment.GetTerminology() or "")
    import vtk
    value = vtk.mutable("")
    return str(value) if segment.GetTag(segment.GetTerminologyEntryTagName(), value) else ""


def collect_classes(seg_nodes, allow_missing: bool = False) -> ClassTable:
    """One class table over all labeled cases: the union of segment names (case-insensitive), in order
    of first appearance, values 1..N, colour and terminology of the first occurrence.

    Problems (blocking): a segmentation with no segment, two segments of one segmentation with the
    same name, a class missing from a case (its voxels would be trained as background; an *empty*
    segment of that name says "absent here" explicitly and is fine). With ``allow_missing`` the
    missing-class problems become warnings.
    """
    classes: dict[str, ClassEntry] = {}
    first_seen: dict[str, str] = {}
    per_node: list[tuple[str, set[str]]] = []
    problems, warnings = [], []
    for node in seg_nodes:
        name = node.GetName()
        segs = segments_of(node)
        if not segs:
            problems.append(f"segmentation '{name}' has no segment")
        keys: set[str] = set()
        for _, seg in segs:
            key = class_key(seg.GetName())
            if key in keys:
                problems.append(f"segmentation '{name}' has two segments named '{seg.GetName()}'")
                continue
            keys.add(key)
            term = segment_terminology(seg)
            if key not in classes:
                classes[key] = ClassEntry(len(classes) + 1, " ".join(seg.GetName().split()),
                                          tuple(float(c) for c in seg.GetColor()), term)
                first_seen[key] = name
            elif term and classes[key].terminology and term != classes[key].terminology:
                warnings.append(f"segment '{seg.GetName()}' of '{name}' has a different terminology than in "
                                f"'{first_seen[key]}' ({terminology_label(term)} vs "
                                f"{terminology_label(classes[key].terminology)}); the first one is kept")
        per_node.append((name, keys))
    for name, keys in per_node:
        for key, c in classes.items():
            if key not in keys:
                msg = (f"segmentation '{name}' has no segment '{c.name}' (found in '{first_seen[key]}'): add it, "
                       f"empty if the structure is absent, or its voxels are trained as background")
                (warnings if allow_missing else problems).append(msg)
    return ClassTable(list(classes.values()), problems, warnings)
