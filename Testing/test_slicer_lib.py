"""The Slicer-side library's plain-Python parts that the panel relies on: the Advanced section's rows
(only what the user changed is sent), the progress-bar text under Qt's format rules, job-folder retention,
``slicer.packaging`` imported before use, the library reload, Windows process flags."""
from __future__ import annotations

import io
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SemiSegExtension"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pythonqt_standin  # noqa: E402
from SemiSegSlicerLib import catalog, jobs, mainloop, optionform, process  # noqa: E402


def test_advanced_rows_send_only_what_the_user_changed():
    """A QDoubleSpinBox shows 10/3 as 3.333333 and a line edit shows a list as text: untouched rows send
    nothing, touched rows send typed values, saved values are shown again and count as changes."""
    qt = pythonqt_standin.qt_module()
    options = [catalog.OptionInfo("weight", "float", 10 / 3), catalog.OptionInfo("steps", "int", 7),
               catalog.OptionInfo("flag", "bool", True), catalog.OptionInfo("mode", "choice", "b", "", ["a", "b"]),
               catalog.OptionInfo("size", "ints", [96, 96]), catalog.OptionInfo("name", "str", "x")]
    form = qt.QFormLayout()
    rows = optionform.add_rows(qt, form, options)
    assert len(form.rows) == 6 and rows["weight"].widget.value == 3.333333
    assert optionform.changed(rows) == {}
    rows["weight"].widget.value = 0.5
    rows["size"].widget.text = "64, 80"
    rows["mode"].widget.setCurrentIndex(0)
    assert optionform.changed(rows) == {"weight": 0.5, "size": [64, 80], "mode": "a"}
    fresh = optionform.add_rows(qt, qt.QFormLayout(), options)
    optionform.restore(fresh, {"steps": 9, "flag": False, "gone": 1})
    assert optionform.changed(fresh) == {"steps": 9, "flag": False}
    for row in rows.values():  # each row's widget has the signal the panel connects for its kind
        signal = optionform.change_signal(row.option.kind)
        assert isinstance(getattr(row.widget, signal.split("(")[0]), pythonqt_standin.Signal), signal


def test_progress_bar_text_keeps_percent_signs_single():
    """QProgressBar replaces %p, %v and %m and has no %% escape: a status line shows as it is."""
    text = "iteration 20/100 · val Dice 81.2% (best 81.2%)"
    assert mainloop.progress_bar_format(text) == text
    assert mainloop.progress_bar_format("50%part") == "50%\u200bpart"  # would have become "50" + percentage
    assert "%%" not in mainloop.progress_bar_format(text)


def test_job_retention_keeps_the_newest_and_every_protected_job(tmp_path):
    import datetime
    made = []
    for minute in range(6):
        job = jobs.new_job_dir(tmp_path, "train" if minute % 2 else "segment",
                               datetime.datetime(2026, 1, 1, 10, minute))
        (job / "job.json").write_text("{}")
        made.append(job)
    twin = jobs.new_job_dir(tmp_path, "train", datetime.datetime(2026, 1, 1, 10, 5))
    assert twin.name == "train-20260101-100500-2"
    (twin / "job.json").write_text("{}")
    made.append(twin)
    (made[1] / "run").mkdir()
    model = made[1] / "run" / "best.pt"
    model.write_bytes(b"")
    (tmp_path / "models" / "kept").mkdir(parents=True)
    removed = jobs.cleanup(tmp_path, keep=2, protect=[made[0], str(model), None])
    assert sorted(removed) == sorted(made[2:5])
    assert [p.name for p in jobs.job_dirs(tmp_path)] == [made[0].name, made[1].name, made[5].name, twin.name]
    assert (tmp_path / "models" / "kept").is_dir()
    assert jobs.cleanup(tmp_path, keep=0, protect=[made[0]]) == [made[1], made[5], twin]


def test_pip_ensure_comes_from_an_imported_slicer_packaging(tmp_path, monkeypatch):
    """``slicer.packaging`` is a submodule ``import slicer`` does not import: it must be imported to be used."""
    from SemiSegSlicerLib import dependencies
    pkg = tmp_path / "slicer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "packaging.py").write_text("def pip_ensure(*a, **k):\n    pass\n")
    fake = types.ModuleType("slicer")
    fake.__path__ = [str(pkg)]
    monkeypatch.setitem(sys.modules, "slicer", fake)
    monkeypatch.delitem(sys.modules, "slicer.packaging", raising=False)
    assert not hasattr(fake, "packaging")  # what the old getattr(slicer, "packaging") saw
    assert dependencies.slicer_packaging().pip_ensure


def test_reload_library_reimports_the_modules():
    """In a fresh interpreter: reloading re-executes the library's modules (here undoing a changed constant);
    this test process keeps its own module objects untouched."""
    import subprocess
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "SemiSegExtension")!r})
import SemiSegSlicerLib
from SemiSegSlicerLib import jobs, mrml_export
import semiseg_trainer.protocol
jobs.JOBS = "changed"
reloaded = SemiSegSlicerLib.reload_library()
assert "SemiSegSlicerLib.jobs" in reloaded and "semiseg_trainer.protocol" in reloaded, reloaded
print(sys.modules["SemiSegSlicerLib.jobs"].JOBS)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "jobs"


def test_windows_processes_start_without_a_console_window(monkeypatch):
    calls = []

    class FakePopen:
        def __init__(self, args, **kw):
            calls.append((args, kw))
            self.stdout, self.stderr, self.pid = io.BytesIO(), io.BytesIO(), 4242

        def poll(self):
            return 0

        def wait(self):
            return 0

    def fake_run(args, **kw):
        calls.append((args, kw))
        return subprocess.CompletedProcess(args, 0, "", "")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(subprocess, "run", fake_run)
    child = process.ChildProcess()
    child.start("PythonSlicer.exe", ["-m", "semiseg_trainer"], {}, ".")
    process.kill_process_tree(4242)
    process.pid_alive(4242)
    no_window = 0x08000000
    assert [c[0][0] for c in calls] == ["PythonSlicer.exe", "taskkill", "tasklist"]
    assert all(c[1]["creationflags"] & no_window for c in calls)
    assert calls[0][1]["creationflags"] & 0x200  # its own process group: Ctrl-C in Slicer's console spares it


def test_mps_choice_and_a_missing_mps_operator_is_one_line(monkeypatch):
    import torch
    from semiseg import devices
    from semiseg.errors import SemiSegError, device_error
    from semiseg.train.loop import select_device
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "mps" and select_device("mps").type == "mps"
    info = devices.describe()
    assert info["mps"] and [c[0] for c in info["choices"]] == ["auto", "mps", "cpu"]
    assert "MPS" in info["choices"][0][1] and "Apple GPU (MPS)" in devices.summary(info)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert select_device("auto").type == "cpu"
    with pytest.raises(SemiSegError, match="device 'mps' requested but Apple's MPS backend is not available"):
        select_device("mps")
    err = NotImplementedError("The operator 'aten::_upsample_bilinear2d_aa.out' is not currently implemented for "
                              "the MPS device. If you want this op to be added in priority during the prototype "
                              "phase of this feature, please comment on https://github.com/pytorch/pytorch/issues/77764.")
    line = str(device_error(err))
    assert line.startswith("aten::_upsample_bilinear2d_aa.out is not implemented on Apple's MPS backend")
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in line and device_error(NotImplementedError("other")) is None
    assert process.trainer_environment({})["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
