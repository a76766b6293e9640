"""What the panel offers, as the engine describes it: methods with their one-line descriptions and
hyper-parameters, the shared training options, the recipe presets, the devices, and the values a run
would use for each (method, dimension, preset).

The engine computes it in a short trainer process (``semiseg catalog``), so that opening the panel never
imports torch or touches a GPU in Slicer's own process; the answer is cached on disk, keyed by the Python
that runs the trainer, its torch version and the engine's files, so the process runs once per install.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from semiseg.atomic import atomic_write
from semiseg.errors import SemiSegError

CATALOG_TIMEOUT_S = 300.0


class CatalogError(SemiSegError):
    """The engine could not describe itself (one line: missing torch, broken install, ...)."""


@dataclass
class OptionInfo:
    name: str
    kind: str                  # int | float | bool | str | choice | ints | floats
    default: object
    help: str = ""
    choices: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


@dataclass
class MethodInfo:
    name: str
    description: str
    uses_unlabeled: bool
    options: list[OptionInfo]


def default_preset(dim: int) -> str:
    return "generic2d" if dim == 2 else "generic3d"


def recipe_key(method: str, dim: int, preset: str = "") -> str:
    return f"{method}|{int(dim)}|{preset}"


class Catalog:
    """Read-only view of ``semiseg catalog``'s JSON."""

    def __init__(self, data: dict):
        if data.get("format") != "semiseg-panel-catalog":
            raise CatalogError("the trainer's catalog is not a SemiSeg panel catalog")
        self.data = data

    @property
    def presets(self) -> list[str]:
        return list(self.data["presets"])

    @property
    def devices(self) -> dict:
        return self.data["devices"]

    def recipe(self, method: str, dim: int, preset: str = "") -> dict:
        """``{"config": {...}, "method_options": {...}}`` or ``{"error": one line}``."""
        return self.data["recipes"].get(recipe_key(method, dim, preset), {"error": f"unknown method '{method}'"})

    def methods(self, dim: int = 3, preset: str = "") -> list[MethodInfo]:
        """Every method, with option defaults as this dimension/preset trains them (the field defaults where
        the combination is impossible)."""
        out = []
        for m in self.data["methods"]:
            values = self.recipe(m["name"], dim, preset).get("method_options", {})
            out.append(MethodInfo(m["name"], m["description"], bool(m["uses_unlabeled"]),
                                  [_option(o, values) for o in m["options"]]))
        return out

    def training_options(self, method: str, dim: int = 3, preset: str = "") -> list[OptionInfo]:
        """The shared training options with the values this method/dimension/preset uses ([] if impossible)."""
        config = self.recipe(method, dim, preset).get("config")
        return [_option(o, config) for o in self.data["training_options"]] if config else []

    def resolved(self, method: str, dim: int = 3, preset: str = "") -> dict:
        """The configuration a method/dimension/preset trains with when nothing else is set ({} if impossible)."""
        return dict(self.recipe(method, dim, preset).get("config", {}))


def _option(o: dict, values: dict) -> OptionInfo:
    return OptionInfo(o["name"], o["kind"], values.get(o["name"], o["default"]), o.get("help", ""),
                      list(o.get("choices", [])))


# ------------------------------------------------------------------------------------------ the trainer
def cache_key(python: str, package_roots: list[str]) -> str:
    """Changes when the Python, its torch or the engine's files change (no import of torch here)."""
    import importlib.metadata
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    h = hashlib.sha1(f"{python}\n{torch_version}".encode())
    for root in package_roots:
        for p in sorted(Path(root).glob("semiseg*/**/*.py")):
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def query(command: list[str], env: dict, timeout: float = CATALOG_TIMEOUT_S, creationflags: int = 0) -> dict:
    """Run ``command`` (``python -m semiseg_trainer catalog``) and return its JSON; one line on failure."""
    from semiseg_trainer import protocol
    try:
        p = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout,
                           stdin=subprocess.DEVNULL, creationflags=creationflags)
    except subprocess.TimeoutExpired:
        raise CatalogError(f"the SemiSeg engine did not describe itself within {timeout:g} s") from None
    except OSError as e:
        raise CatalogError(f"cannot start the SemiSeg trainer ({command[0]}): {e}") from None
    if p.returncode == 0:
        try:
            return json.loads(p.stdout)
        except ValueError:
            pass
    _, message, _ = protocol.diagnose_exit(p.returncode if p.returncode else 1, [], p.stderr)
    raise CatalogError(message)


def load(cache_dir, command: list[str], env: dict, package_roots: list[str], refresh: bool = False,
         creationflags: int = 0) -> Catalog:
    """The catalog from the cache, or from the trainer (then cached)."""
    path = Path(cache_dir) / f"catalog-{cache_key(command[0], package_roots)}.json"
    if path.is_file() and not refresh:
        try:
            return Catalog(json.loads(path.read_text()))
        except (ValueError, CatalogError):
            pass  # a torn or foreign file: ask the trainer again
    data = query(command, env, creationflags=creationflags)
    catalog = Catalog(data)
    atomic_write(path, json.dumps(data))
    return catalog


# ------------------------------------------------------------------------------------------ a panel state
def training_config(method: str, dim: int, preset: str = "", iterations: int = 0, labeled_batch: int = 0,
                    unlabeled_batch: int = 0, patch_size=(), device: str = "auto", val_every: int | None = None,
                    method_options: dict | None = None, threads: int = 0, extra: dict | None = None) -> dict:
    """The explicit ``TrainConfig`` values of a panel state (0/empty = the preset's default)."""
    cfg: dict = {"method": method, "dim": int(dim), "device": device}
    if preset:
        cfg["preset"] = preset
    for key, value in (("iterations", iterations), ("labeled_batch", labeled_batch),
                       ("unlabeled_batch", unlabeled_batch), ("threads", threads)):
        if value:
            cfg[key] = int(value)
    if patch_size:
        cfg["patch_size"] = [int(p) for p in patch_size]
    if val_every is not None:
        cfg["val_every"] = int(val_every)
    if method_options:
        cfg["method_options"] = dict(method_options)
    cfg.update(extra or {})
    return cfg
