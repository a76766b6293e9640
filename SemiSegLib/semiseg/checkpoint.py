"""Checkpoints: written atomically (:mod:`semiseg.atomic`), holding everything needed to
segment later (network config and weights, classes, normalisation, patch/slice settings) and, for
the resumable ``last`` checkpoint, the full training state."""
from __future__ import annotations

from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import SemiSegError
from .networks import build_network, channels_last_format

FORMAT = "semiseg-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, payload: dict) -> None:
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                p = p / name
                break
    if not p.is_file():
        raise SemiSegError(f"model checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise SemiSegError(f"cannot read checkpoint {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SemiSegError(f"{p} is not a SemiSeg checkpoint")
    ckpt["path"] = str(p)
    return ckpt


def network_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The checkpoint's network in eval mode on ``device``, in the channels-last layout where it is faster
    (:func:`semiseg.networks.channels_last_format`; same predictions up to rounding)."""
    cfg = dict(ckpt["network"])
    net = build_network(cfg.pop("name"), **cfg)
    net.load_state_dict(ckpt["model"])
    net = net.to(device).eval()
    layout = channels_last_format(net.dim, device)
    return net.to(memory_format=layout) if layout is not None else net
