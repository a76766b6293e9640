"""Slicer-side library of the SemiSeg module.

Everything here except :mod:`process` (QProcess adapter) and :mod:`dependencies` (Slicer's pip and
PyTorch utilities, imported lazily) is free of Qt and of the ``slicer.app``/``slicer.mrmlScene``
globals: functions take an explicit MRML scene and use static logic calls, so they run on real MRML
outside Slicer (the ``slicer-core`` wheel) in the test suite.
"""
