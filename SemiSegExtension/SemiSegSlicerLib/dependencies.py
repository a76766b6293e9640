"""Python dependencies of the module, checked on first use (never at import, never installed in
testing mode, always after asking).

* torch only through the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA/CPU wheel that fits
  the GPU driver); never pip-installed by us.
* everything else from ``Resources/requirements.txt``: ``slicer.packaging.pip_ensure`` on Slicer
  5.12+, a confirmation dialog + ``slicer.util.pip_install`` before.
* Slicer's own packages (SimpleITK, numpy, vtk, requests, ...) are never installed or upgraded.

The checks (:func:`missing_requirements`, :func:`torch_status`) are plain Python; only
:func:`ensure_dependencies` talks to Slicer.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

TORCH_REQUIREMENT = ">=2.1"
NEVER_INSTALL = {"torch", "torchvision", "simpleitk", "numpy", "vtk", "requests", "slicer", "qt", "ctk"}


class DependencyError(Exception):
    def __init__(self, message: str, restart_required: bool = False):
        super().__init__(" ".join(str(message).split()))
        self.restart_required = restart_required


def read_requirements(path) -> list[str]:
    lines = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]


def _satisfied(requirement: str) -> bool:
    name = _name(requirement)
    try:
        from packaging.requirements import Requirement
        marker = Requirement(requirement).marker
        if marker is not None and not marker.evaluate():
            return True  # not for this platform/Python
    except Exception:  # noqa: BLE001 - no 'packaging' or an unparsable line: check the name only
        pass
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
        return Requirement(requirement).specifier.contains(installed, prereleases=True)
    except Exception:  # noqa: BLE001 - no 'packaging': presence is all we can check
        return True


def missing_requirements(requirements: list[str]) -> list[str]:
    """Requirements not satisfied here, Slicer's own packages and torch excluded."""
    return [r for r in requirements if _name(r).lower() not in NEVER_INSTALL and not _satisfied(r)]


def torch_status() -> tuple[bool, str]:
    """(installed, one line): torch's version from its package metadata, without importing it (Slicer's
    process never imports torch: whether it imports and which GPUs it sees is asked of the trainer
    process, :mod:`SemiSegSlicerLib.catalog`)."""
    if importlib.util.find_spec("torch") is None:
        return False, "PyTorch is not installed: install it with the PyTorch extension (PyTorch Utils module)"
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "(unknown version)"
    return True, f"torch {version}"


def slicer_packaging():
    """``slicer.packaging`` (Slicer 5.12+: ``pip_ensure``), imported, or None on older Slicer. It is a
    submodule that ``import slicer`` does not import."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def ensure_dependencies(requirements_path, ask: bool = True) -> bool:
    """Make torch and the requirements importable inside Slicer. Returns True when all is there;
    raises DependencyError with one actionable line otherwise (e.g. the user declined, testing mode)."""
    import slicer
    testing = bool(getattr(slicer.app, "testingEnabled", lambda: False)())
    ok, text = torch_status()
    if not ok:
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError("the PyTorch extension is missing: install 'PyTorch' from the Extensions Manager "
                                  "(SemiSeg depends on it) and restart Slicer") from None
        logic = PyTorchUtils.PyTorchUtilsLogic()
        if not logic.torchInstalled():
            if testing:
                raise DependencyError("PyTorch is not installed and nothing is installed in testing mode")
            if ask and not slicer.util.confirmOkCancelDisplay(
                    "SemiSeg needs PyTorch. Install it now with the PyTorch extension? This can take several minutes.",
                    "SemiSeg: install PyTorch"):
                raise DependencyError("PyTorch is required: install it with the PyTorch Utils module")
            logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            if not logic.torchInstalled():
                raise DependencyError("PyTorch installation failed: see the Python console, or use PyTorch Utils")
    missing = missing_requirements(read_requirements(requirements_path))
    if not missing:
        return True
    if testing:
        raise DependencyError(f"missing Python packages in testing mode: {', '.join(missing)}")
    packaging = slicer_packaging()
    if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12+
        packaging.pip_ensure(missing, skip_packages=sorted(NEVER_INSTALL), requester="SemiSeg")
    else:
        if ask and not slicer.util.confirmOkCancelDisplay(
                f"SemiSeg needs these Python packages: {', '.join(missing)}. Install them now?",
                "SemiSeg: install packages"):
            raise DependencyError(f"required Python packages not installed: {', '.join(missing)}")
        slicer.util.pip_install(missing)
    importlib.invalidate_caches()
    still = missing_requirements(missing)
    if still:
        raise DependencyError(f"could not install {', '.join(still)}; install them from the Python console with "
                              f"slicer.util.pip_install", restart_required=True)
    return True
