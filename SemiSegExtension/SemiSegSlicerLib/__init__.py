"""Slicer-side library of the SemiSeg module.

Everything here except :mod:`mainloop` (a ``qt.QTimer`` and ``slicer.app.processEvents``) and
:mod:`dependencies` (Slicer's pip and PyTorch utilities, imported lazily) is free of Qt and of the
``slicer.app``/``slicer.mrmlScene`` globals: functions take an explicit MRML scene and use static logic calls, so they run on real MRML
outside Slicer (the ``slicer-core`` wheel) in the test suite.
"""


def reload_library() -> list[str]:
    """Re-import this library's modules (Slicer's Reload button reloads only the module file) and the job
    protocol they share with the trainer. Returns the reloaded module names."""
    import importlib
    import sys
    names = sorted(n for n in sys.modules if n.startswith(__name__ + ".")) + ["semiseg_trainer.protocol"]
    reloaded = []
    for name in names:
        module = sys.modules.get(name)
        if module is not None:
            importlib.reload(module)
            reloaded.append(name)
    return reloaded
