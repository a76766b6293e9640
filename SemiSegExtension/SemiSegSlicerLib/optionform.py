"""The Advanced section's option rows: one widget per option (a method's ``Options`` field or a shared
training option), and the values the user changed.

A value is "changed" when the widget no longer shows what it showed right after it was built, not when it
differs from the engine's default: a widget displays a default in its own way (a ``QDoubleSpinBox`` rounds
10/3 to its decimals, a line edit shows a list as text), and sending that display back would override the
engine's exact default with a value the user never chose.

``qt`` is passed in (PythonQt's module inside Slicer, a stand-in in the tests), so this is plain Python.
"""
from __future__ import annotations

from dataclasses import dataclass


# the signal each kind of row emits when the user changes it (PythonQt's ``widget.connect(signature, slot)``)
CHANGE_SIGNALS = {"bool": "toggled(bool)", "int": "valueChanged(int)", "float": "valueChanged(double)",
                  "choice": "currentIndexChanged(int)"}


def change_signal(kind: str) -> str:
    return CHANGE_SIGNALS.get(kind, "textChanged(QString)")


@dataclass
class OptionRow:
    option: object          # catalog.OptionInfo
    widget: object
    shown: object           # the widget's value right after it was built


def make_widget(qt, o):
    """The widget for one option, showing its default."""
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
        default = o.default
        text = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else ("" if default is None else str(default))
        w = qt.QLineEdit(text)
    return w


def read(o, w):
    """The option's value as the widget shows it now (typed; a list for ints/floats)."""
    if o.kind == "bool":
        return bool(w.checked)
    if o.kind == "int":
        return int(w.value)
    if o.kind == "float":
        return float(w.value)
    if o.kind == "choice":
        return w.currentData
    if o.kind in ("ints", "floats"):
        cast = int if o.kind == "ints" else float
        return [cast(x) for x in str(w.text).replace(",", " ").split()]
    return str(w.text)


def add_rows(qt, form, options) -> dict[str, OptionRow]:
    """One labelled row per option in ``form`` (a QFormLayout), help as tooltip."""
    rows = {}
    for o in options:
        w = make_widget(qt, o)
        w.toolTip = o.help
        label = qt.QLabel(o.label + ":")
        label.toolTip = o.help
        form.addRow(label, w)
        rows[o.name] = OptionRow(o, w, read(o, w))
    return rows


def changed(rows: dict[str, OptionRow]) -> dict:
    """``{name: value}`` of the rows the user changed since they were built."""
    out = {}
    for name, row in rows.items():
        value = read(row.option, row.widget)
        if value != row.shown:
            out[name] = value
    return out


def restore(rows: dict[str, OptionRow], values: dict) -> None:
    """Show saved user values (the parameter node's) in the rows that exist; unknown names are skipped."""
    for name, value in values.items():
        row = rows.get(name)
        if row is None:
            continue
        o, w = row.option, row.widget
        if o.kind == "bool":
            w.checked = bool(value)
        elif o.kind in ("int", "float"):
            w.value = value
        elif o.kind == "choice":
            w.setCurrentIndex(max(0, w.findData(value)))
        else:
            w.text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
