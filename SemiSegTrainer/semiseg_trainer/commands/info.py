"""What is available, printed: ``semiseg methods`` (and ``--deviations``), ``semiseg presets``,
``semiseg devices`` (one line, or JSON with --json) and ``semiseg catalog`` (the Slicer panel's JSON)."""
from __future__ import annotations

import json

from .. import protocol
from ..options import describe_presets


def cmd_methods(ns, reporter) -> int:
    from semiseg.methods import METHODS
    if ns.deviations:
        from semiseg.methods.reference import table_lines
        print("\n".join(table_lines(sorted(METHODS))))
        return protocol.EXIT_OK
    import dataclasses
    for name, cls in sorted(METHODS.items()):
        print(f"{name}: {cls.description}")
        for f in dataclasses.fields(cls.Options):
            print(f"    --{f.name.replace('_', '-')} (default {f.default}): {f.metadata.get('help', '')}")
    return protocol.EXIT_OK


def cmd_presets(ns, reporter) -> int:
    print(describe_presets())
    return protocol.EXIT_OK


def cmd_devices(ns, reporter) -> int:
    from semiseg import devices
    if ns.json:
        print(json.dumps(devices.describe()))
    else:
        print(devices.summary(devices.describe()))
    return protocol.EXIT_OK


def cmd_catalog(ns, reporter) -> int:
    from .. import panel_catalog
    print(json.dumps(panel_catalog.build()))
    return protocol.EXIT_OK
