"""The live loss/Dice plot as MRML: a table node (one row per progress event) and a plot chart with
one series per curve (no Qt; explicit scene). The module shows the chart with the Plots module's
``ShowChartInLayout``."""
from __future__ import annotations

import math

CURVES = ("loss", "val_dice")


class TrainingPlot:
    """Table + chart + series nodes of one training run, created on first use and reused."""

    def __init__(self, scene, name: str = "SemiSeg training"):
        self.scene = scene
        self.name = name
        self.table = None
        self.chart = None
        self.series: dict[str, object] = {}

    def create(self) -> "TrainingPlot":
        """Make the table and chart now, so the chart can be shown before the first progress event."""
        self._ensure_nodes()
        return self

    def _ensure_nodes(self) -> None:
        if self.table is None or self.scene.GetNodeByID(self.table.GetID()) is None:
            self.table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{self.name} table")
            self.chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.name)
            self.chart.SetTitle(self.name)
            self.chart.SetXAxisTitle("iteration")
            self.chart.SetYAxisTitle("loss / validation Dice")
            self.series = {}

    def update(self, progress) -> None:
        """Rewrite the table from a :class:`ProgressState` and make sure each curve has a series."""
        import vtk
        rows = progress.plot_rows()
        columns = progress.plot_columns()
        self._ensure_nodes()
        table = vtk.vtkTable()
        for name in columns:
            arr = vtk.vtkDoubleArray()
            arr.SetName(name)
            arr.SetNumberOfTuples(len(rows))
            table.AddColumn(arr)
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                table.GetColumn(c).SetValue(r, value if not math.isnan(value) else float("nan"))
        self.table.SetAndObserveTable(table)
        self.table.Modified()
        for curve in CURVES:
            if curve in columns and curve not in self.series:
                s = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {curve.replace('_', ' ')}")
                s.SetAndObserveTableNodeID(self.table.GetID())
                s.SetXColumnName("iteration")
                s.SetYColumnName(curve)
                s.SetPlotType(s.PlotTypeScatter)
                s.SetMarkerStyle(s.MarkerStyleNone if curve == "loss" else s.MarkerStyleCircle)
                s.SetColor(*((0.85, 0.3, 0.2) if curve == "loss" else (0.2, 0.5, 0.9)))
                self.chart.AddAndObservePlotSeriesNodeID(s.GetID())
                self.series[curve] = s

    def values(self, column: str) -> list[float]:
        """A column of the table (for checks and scripting)."""
        t = self.table.GetTable()
        col = t.GetColumnByName(column)
        return [col.GetValue(i) for i in range(t.GetNumberOfRows())] if col is not None else []
