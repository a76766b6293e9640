"""Class tables across label files: reading one label file (labelmap or Slicer segmentation) in terms of
a class table, the ``class_map`` option, and matching the classes of a data set's label files (segments
by name, labelmaps by value) into the one table a model is trained with.
"""
from __future__ import annotations

import os
import re
import json
from typing import Sequence

from ..errors import SemiSegError
from .io import _check_readable, _describe_classes, default_color, read_labelmap
from .segfile import is_segmentation_file, normalize_class_name, read_segment_classes, read_segmentation
from .volume import ClassInfo, Volume

__all__ = ["class_coverage_warning", "label_file_classes", "match_label_classes", "normalize_class_name", "parse_class_map", "read_label"]

_DROP = ("background", "0")  # class_map targets that remove a source (its voxels become background)


def parse_class_map(spec) -> dict[str, str]:
    """``class_map`` option -> {normalised source: canonical class name}.

    ``spec`` is ``"source=class; source=class"`` (``;`` or new lines between entries), a JSON object
    ``{"source": "class"}`` given inline or as a ``.json`` file path, or a dict. A source is a segment
    name (matched case-insensitively) or a label value of a plain labelmap (``"4=kidney"``); the class
    ``background`` (or ``0``) drops that source.
    """
    if spec is None or spec == "" or spec == {}:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        text = str(spec).strip()
        source = "class_map"
        if not text.startswith("{") and text.lower().endswith(".json"):
            if not os.path.isfile(os.path.expanduser(text)):
                raise SemiSegError(f"class_map file not found: {text}")
            source = os.path.expanduser(text)
            with open(source) as f:
                text = f.read().strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError as exc:
                raise SemiSegError(f"cannot parse {source} as JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise SemiSegError(f"{source} must be a JSON object mapping source names to classes")
            items = list(obj.items())
        else:
            items = []
            for entry in re.split(r"[;\n]", text):
                if not entry.strip():
                    continue
                if "=" not in entry:
                    raise SemiSegError(f"class_map entry '{entry.strip()}' is not 'source=class'")
                src, _, dst = entry.rpartition("=")
                items.append((src, dst))
    out: dict[str, str] = {}
    for src, dst in items:
        key, target = normalize_class_name(src), " ".join(str(dst).split())
        if not key or not target:
            raise SemiSegError(f"class_map entry '{str(src).strip()}={str(dst).strip()}' has an empty side")
        if key in out and normalize_class_name(out[key]) != normalize_class_name(target):
            raise SemiSegError(f"class_map maps '{str(src).strip()}' twice: to '{out[key]}' and to '{target}'")
        out[key] = target
    return out


def read_label(path, classes: Sequence[ClassInfo] | None = None,
               mapping: dict | None = None) -> tuple[Volume, list[ClassInfo]]:
    """Read a labelmap (integer NRRD/NIfTI/MHA) or a Slicer segmentation (``.seg.nrrd``).

    Returns the labelmap (uint8, or int16 for values above 255) in (x, y, z) and its classes.

    * Slicer segmentation: segments of all layers are merged into one labelmap; each segment keeps its
      label value unless values collide across layers, then segments are numbered 1..N in file
      order. Classes come from segment names, values and colours. If ``classes`` is given, segments
      are matched to them by name (case-insensitive) and voxels get the matching class's value.
    * Plain labelmap: classes are ``class_<v>`` for each non-zero value present (palette colours),
      unless ``classes`` is given, in which case every value present must be one of theirs.
    * ``mapping`` (with ``classes``; made by :func:`match_label_classes`): the explicit output value of
      every segment (key: :func:`normalize_class_name` of its name) or label value (key: the int);
      0 drops it. Several sources may map to one value (merged).
    """
    path = os.fspath(path)
    _check_readable(path, "label file")
    if mapping is not None and classes is None:
        raise ValueError("read_label: a mapping needs the classes it maps to")
    if is_segmentation_file(path):
        return read_segmentation(path, classes, mapping)
    return read_labelmap(path, classes, mapping)


def label_file_classes(path) -> tuple[str, list[ClassInfo]]:
    """The classes one label file holds, as :func:`read_label` would return them without ``classes``:
    ``("segments", ...)`` for a Slicer segmentation (from its header only) or ``("values", ...)`` for a
    plain labelmap (the non-zero values present; this reads the voxels)."""
    path = os.fspath(path)
    _check_readable(path, "label file")
    if not is_segmentation_file(path):
        return "values", read_labelmap(path, None)[1]
    return "segments", read_segment_classes(path)


def _quoted(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


def match_label_classes(files, class_map=None) -> tuple[list[ClassInfo], dict[str, dict]]:
    """Match the classes of several label files; returns (classes, {path: mapping for read_label}).

    ``files``: label file paths, or (path, kind, classes) triples from :func:`label_file_classes`.
    Rules: ``class_map`` (see :func:`parse_class_map`) renames sources first. Slicer segmentations are
    matched by segment name (case-insensitive): the first one is the reference and every other must
    hold exactly its names, else a one-line SemiSegError names both files and the differing names.
    Plain labelmaps are matched by label value: to the reference segmentation's values, or, when the
    data set has labelmaps only, the classes are the union of the values present (``class_<v>`` unless
    renamed). The resulting classes are numbered 1..K in the order of their source values (the
    network's output channels), so non-contiguous source values are renumbered.
    """
    cmap = parse_class_map(class_map)
    scans = [(os.fspath(f[0]), f[1], list(f[2])) if isinstance(f, tuple) else (os.fspath(f), *label_file_classes(f))
             for f in files]
    if not scans:
        return [], {}
    hint = "; fix it with the class_map option (e.g. --class-map 'source name=class name')"

    def seg_entries(classes):
        """[(key, canonical name or None if dropped, source value, colour)] of a segmentation."""
        out = []
        for c in classes:
            target = cmap.get(normalize_class_name(c.name), c.name)
            out.append((normalize_class_name(c.name), None if target.casefold() in _DROP else target, c.value, c.color))
        return out

    def value_target(v):
        t = cmap.get(str(int(v)))
        return t, (t is not None and t.casefold() in _DROP)

    # canonical classes: [name, source value, colour]; key = normalised name
    canon: dict[str, list] = {}
    ref = next((sc for sc in scans if sc[1] == "segments"), None)
    if ref is not None:
        ref_path = ref[0]
        for key, target, value, color in seg_entries(ref[2]):
            if target is not None and normalize_class_name(target) not in canon:
                canon[normalize_class_name(target)] = [target, value, color]
    else:
        ref_path = None
        for _, _, file_classes in scans:
            for c in file_classes:
                t, drop = value_target(c.value)
                if drop:
                    continue
                name = t if t is not None else f"class_{c.value}"
                entry = canon.setdefault(normalize_class_name(name), [name, c.value, default_color(c.value)])
                entry[1] = min(entry[1], c.value)
    order = sorted(canon, key=lambda k: (canon[k][1], list(canon).index(k)))
    classes = [ClassInfo(i + 1, canon[k][0], tuple(canon[k][2])) for i, k in enumerate(order)]
    value_of = {k: i + 1 for i, k in enumerate(order)}
    ref_entries = seg_entries(ref[2]) if ref is not None else []
    # a segmentation reference's source label value -> output value (labelmaps are matched by value)
    ref_value = {v: (value_of[normalize_class_name(t)] if t is not None else 0) for _, t, v, _ in ref_entries}
    ref_name_of_value = {v: t for _, t, v, _ in ref_entries if t is not None}

    mappings: dict[str, dict] = {}
    for path, kind, file_classes in scans:
        mapping: dict = {}
        if kind == "segments":  # then ref is a segmentation: match by (mapped) name
            entries = seg_entries(file_classes)
            have = {normalize_class_name(t): t for _, t, _, _ in entries if t is not None}
            missing = [canon[k][0] for k in order if k not in have]
            extra = [t for k, t in have.items() if k not in canon]
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"{path} lacks {_quoted(missing)} which {ref_path} has")
                if extra:
                    parts.append(f"{path} has {_quoted(extra)} which {ref_path} lacks")
                for _, t, v, _ in entries:  # same value, other name: the likely renaming
                    if t is not None and normalize_class_name(t) not in canon and v in ref_name_of_value \
                            and normalize_class_name(ref_name_of_value[v]) not in have:
                        parts.append(f"value {v} is '{ref_name_of_value[v]}' in {ref_path} but '{t}' in {path}")
                raise SemiSegError(f"label files disagree on the classes: {'; '.join(parts)}{hint}")
            for key, target, _, _ in entries:
                mapping[key] = value_of[normalize_class_name(target)] if target is not None else 0
        else:
            for c in file_classes:
                t, drop = value_target(c.value)
                if drop:
                    mapping[c.value] = 0
                elif t is not None:
                    if normalize_class_name(t) not in value_of:
                        raise SemiSegError(f"class_map maps label value {c.value} of {path} to '{t}', which is not "
                                           f"a class of {ref_path} ({_describe_classes(classes)})")
                    mapping[c.value] = value_of[normalize_class_name(t)]
                elif ref is None:
                    mapping[c.value] = value_of[normalize_class_name(f"class_{c.value}")]
                elif c.value in ref_value:
                    mapping[c.value] = ref_value[c.value]
                else:
                    raise SemiSegError(f"label files disagree on the classes: label value {c.value} in {path} is "
                                       f"none of the values of {ref_path} ({_describe_classes(ref[2])}){hint}")
        mappings[path] = mapping
    return classes, mappings


def class_coverage_warning(classes: Sequence[ClassInfo], mappings: dict[str, dict]) -> str | None:
    """One warning line when a class is found in a single label file of several (e.g. 255 in one file where
    the others use 1, which makes 255 a class of its own), with every class's coverage; None otherwise.
    ``mappings``: {label file: {source: class value}} as :func:`match_label_classes` returns them."""
    n = len(mappings)
    if n < 2:
        return None
    files_of = {c.value: [p for p, m in mappings.items() if c.value in set(m.values())] for c in classes}
    lonely = [c for c in classes if len(files_of[c.value]) == 1]
    if not lonely:
        return None
    where = "; ".join(f"'{c.name}' only in {os.path.basename(files_of[c.value][0])}" for c in lonely)
    coverage = ", ".join(f"{c.name}: {len(files_of[c.value])} of {n}" for c in classes)
    return (f"{len(lonely)} class(es) found in 1 of {n} labeled cases ({where}): is one structure labeled with "
            f"different values in different files? (--class-map merges them) Classes present per case: {coverage}")
