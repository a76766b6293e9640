"""A stand-in for what exists only inside the Slicer application: PythonQt's ``qt`` module (the classes
the SemiSeg module and its library use) and ``slicer.app``. It is built to fail where PythonQt fails:

- a ``QByteArray`` returned by Qt exposes only ``data()`` (bytes), ``size()`` and ``isEmpty()``:
  ``bytes(qbytearray)``, iteration and ``len()`` raise ``TypeError`` as PythonQt's wrapper does;
- signals are delivered on the main thread and only when events are processed
  (``slicer.app.processEvents()``, ``QProcess.waitForFinished``), never from another thread and never
  while Python code is simply running;
- an exception raised in a slot is printed to stderr and swallowed; the emitter carries on.

``QProcess`` is real: it runs the program with :mod:`subprocess`, reads its pipes on background threads and
hands the data to Qt-side buffers that the main thread sees when events are processed.
"""
from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
import traceback
import types


class QByteArray:
    """What PythonQt returns for a Qt ``QByteArray``: no buffer protocol, no iteration, no ``len``."""

    def __init__(self, data: bytes = b""):
        self._data = bytes(data)

    def data(self) -> bytes:
        return self._data

    def size(self) -> int:
        return len(self._data)

    def isEmpty(self) -> bool:
        return not self._data

    def __iter__(self):
        raise TypeError("'QByteArray' object is not iterable")

    def __len__(self):
        raise TypeError("object of type 'QByteArray' has no len()")


class EventLoop:
    """The application's event queue: posted calls and timers run only in :meth:`process_events`, on the
    thread that calls it (the main thread)."""

    def __init__(self):
        self.main_thread = threading.main_thread()
        self.posted: queue.Queue = queue.Queue()
        self.timers: list["QTimer"] = []
        self.swallowed: list[BaseException] = []   # exceptions PythonQt would have printed and dropped
        self.processed = 0

    def deliver(self, slot, *args) -> None:
        """Run a slot as PythonQt does: an exception is printed and swallowed."""
        assert threading.current_thread() is self.main_thread, "a Qt signal was delivered off the main thread"
        try:
            slot(*args)
        except Exception as e:  # noqa: BLE001 - PythonQt's behaviour
            self.swallowed.append(e)
            traceback.print_exc(file=sys.stderr)

    def process_events(self) -> None:
        assert threading.current_thread() is self.main_thread, "processEvents called off the main thread"
        self.processed += 1
        while True:
            try:
                fn = self.posted.get_nowait()
            except queue.Empty:
                break
            fn()
        now = time.monotonic()
        for timer in [t for t in self.timers if t._active and t._due <= now]:
            if timer._single:
                timer._active = False
                self.timers.remove(timer)
            else:
                timer._due = now + timer._interval / 1000.0
            timer.timeout.emit()


LOOP = EventLoop()


class Signal:
    def __init__(self):
        self._slots: list = []

    def connect(self, slot) -> None:
        self._slots.append(slot)

    def disconnect(self, slot=None) -> None:
        self._slots = [] if slot is None else [s for s in self._slots if s != slot]

    def emit(self, *args) -> None:
        for slot in list(self._slots):
            LOOP.deliver(slot, *args)


class QObject:
    def connect(self, signature: str, slot) -> None:
        """PythonQt's ``obj.connect("signal(args)", slot)``."""
        getattr(self, signature.split("(", 1)[0]).connect(slot)

    def disconnect(self, signature: str, slot=None) -> None:
        getattr(self, signature.split("(", 1)[0]).disconnect(slot)


class QTimer(QObject):
    def __init__(self, parent=None):
        self.timeout = Signal()
        self._interval = 0
        self._single = False
        self._active = False
        self._due = 0.0

    def setInterval(self, ms: int) -> None:
        self._interval = int(ms)

    def interval(self) -> int:
        return self._interval

    def setSingleShot(self, single: bool) -> None:
        self._single = bool(single)

    def isActive(self) -> bool:
        return self._active

    def start(self, ms: int | None = None) -> None:
        if ms is not None:
            self._interval = int(ms)
        self._active = True
        self._due = time.monotonic() + self._interval / 1000.0
        if self not in LOOP.timers:
            LOOP.timers.append(self)

    def stop(self) -> None:
        self._active = False
        if self in LOOP.timers:
            LOOP.timers.remove(self)

    @staticmethod
    def singleShot(ms: int, slot) -> None:
        t = QTimer()
        t.setSingleShot(True)
        t.timeout.connect(slot)
        t.start(ms)


class QProcessEnvironment:
    def __init__(self):
        self.values: dict[str, str] = {}

    def insert(self, key: str, value: str) -> None:
        self.values[str(key)] = str(value)


class QProcess(QObject):
    """``qt.QProcess`` with separate channels: readyRead*/finished/errorOccurred are emitted only from
    ``processEvents`` or ``waitForFinished`` on the main thread; reads return :class:`QByteArray`."""
    NotRunning, Starting, Running = 0, 1, 2
    NormalExit, CrashExit = 0, 1
    FailedToStart = 0
    SeparateChannels, MergedChannels = 0, 1

    def __init__(self, parent=None):
        self.readyReadStandardOutput = Signal()
        self.readyReadStandardError = Signal()
        self.finished = Signal()
        self.errorOccurred = Signal()
        self._env: dict | None = None
        self._cwd: str | None = None
        self._proc: subprocess.Popen | None = None
        self._buffers = {"out": bytearray(), "err": bytearray()}
        self._lock = threading.Lock()
        self._events: queue.Queue = queue.Queue()
        self._state = self.NotRunning
        self._error = ""

    def setProcessChannelMode(self, mode) -> None:
        pass

    def setProcessEnvironment(self, env: QProcessEnvironment) -> None:
        self._env = dict(env.values)

    def setWorkingDirectory(self, path: str) -> None:
        self._cwd = path

    def start(self, program: str, args=()) -> None:
        try:
            self._proc = subprocess.Popen([program, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL, env=self._env, cwd=self._cwd,
                                          start_new_session=True)
        except OSError as e:
            self._error = str(e)
            LOOP.posted.put(lambda: self.errorOccurred.emit(self.FailedToStart))
            return
        self._state = self.Running
        self._open = 2
        for stream, kind in ((self._proc.stdout, "out"), (self._proc.stderr, "err")):
            threading.Thread(target=self._read, args=(stream, kind), daemon=True).start()
        LOOP.posted.put(self._drain)

    def _read(self, stream, kind: str) -> None:  # background thread: buffers only, never emits
        for chunk in iter(lambda: stream.read1(65536), b""):
            with self._lock:
                self._buffers[kind] += chunk
            self._events.put(kind)
            LOOP.posted.put(self._drain)
        self._events.put("closed")
        LOOP.posted.put(self._drain)

    def _drain(self) -> None:  # main thread, from processEvents / waitForFinished
        while True:
            try:
                kind = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "out":
                self.readyReadStandardOutput.emit()
            elif kind == "err":
                self.readyReadStandardError.emit()
            else:
                self._open -= 1
                if self._open == 0 and self._state == self.Running:
                    code = self._proc.wait()
                    self._state = self.NotRunning
                    self.finished.emit(code if code >= 0 else 0, self.NormalExit if code >= 0 else self.CrashExit)

    def _take(self, kind: str) -> QByteArray:
        with self._lock:
            data = bytes(self._buffers[kind])
            self._buffers[kind].clear()
        return QByteArray(data)

    def readAllStandardOutput(self) -> QByteArray:
        return self._take("out")

    def readAllStandardError(self) -> QByteArray:
        return self._take("err")

    def waitForFinished(self, msecs: int = 30000) -> bool:
        end = time.monotonic() + msecs / 1000.0
        while self._state == self.Running:
            self._drain()
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def state(self) -> int:
        return self._state

    def processId(self) -> int:
        return self._proc.pid if self._proc else 0

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def errorString(self) -> str:
        return self._error


# ------------------------------------------------------------------------------------------ widgets
class QWidget(QObject):
    """Properties as attributes (``w.toolTip = ...``), as PythonQt exposes Qt properties."""

    def __init__(self, *args):
        self.toolTip = ""
        self.enabled = True
        self.visible = True


class QLabel(QWidget):
    def __init__(self, text: str = ""):
        super().__init__()
        self.text = text


class QCheckBox(QWidget):
    def __init__(self):
        super().__init__()
        self.toggled = Signal()
        self.checked = False


class QSpinBox(QWidget):
    """Clamps what it is given to its range, as Qt does."""

    def __init__(self):
        super().__init__()
        self.valueChanged = Signal()
        self._min, self._max, self._value = 0, 99, 0

    def setRange(self, lo, hi) -> None:
        self._min, self._max = self._coerce(lo), self._coerce(hi)

    def _coerce(self, v):
        return int(v)

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v) -> None:
        self._value = self._coerce(min(max(v, self._min), self._max))


class QDoubleSpinBox(QSpinBox):
    """Also rounds what it is given to its decimals (2 by default), as Qt does."""

    def __init__(self):
        super().__init__()
        self._max, self._decimals = 99.99, 2

    def setDecimals(self, n: int) -> None:
        self._decimals = int(n)

    def _coerce(self, v):
        return round(float(v), self._decimals)


class QComboBox(QWidget):
    def __init__(self):
        super().__init__()
        self.currentIndexChanged = Signal()
        self._items: list[tuple[str, object]] = []
        self._index = -1

    def addItem(self, text: str, data=None) -> None:
        self._items.append((text, data))
        if self._index < 0:
            self._index = 0

    def findData(self, data) -> int:
        return next((i for i, (_, d) in enumerate(self._items) if d == data), -1)

    def setCurrentIndex(self, i: int) -> None:
        self._index = int(i)

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentData(self):
        return self._items[self._index][1] if 0 <= self._index < len(self._items) else None


class QLineEdit(QWidget):
    def __init__(self, text: str = ""):
        super().__init__()
        self.textChanged = Signal()
        self.text = text


class QFormLayout(QObject):
    def __init__(self, parent=None):
        self.rows: list[tuple] = []

    def addRow(self, *widgets) -> None:
        self.rows.append(widgets)


class QSettings:
    """Application settings kept in memory for the test session."""
    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value) -> None:
        self.store[key] = value


def qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    for cls in (QByteArray, QTimer, QProcess, QProcessEnvironment, QSettings, QObject, QWidget, QLabel, QCheckBox,
                QSpinBox, QDoubleSpinBox, QComboBox, QLineEdit, QFormLayout):
        setattr(qt, cls.__name__, cls)
    return qt


class Application:
    """``slicer.app``: processEvents runs the event loop; the temporary path is a real folder."""

    def __init__(self, temporary_path: str):
        self.temporaryPath = temporary_path

    def processEvents(self) -> None:
        LOOP.process_events()

    def testingEnabled(self) -> bool:
        return False


class PlotsModule:
    """``slicer.modules.plots``: records the charts shown in the layout."""

    def __init__(self):
        self.shown: list = []

    def logic(self):
        return self

    def ShowChartInLayout(self, chart) -> None:
        self.shown.append(chart)


def pump_until(condition, timeout: float, interval: float = 0.02) -> bool:
    """What Slicer's main loop does while the user waits: process events until ``condition()``."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        LOOP.process_events()
        time.sleep(interval)
    return True


def reset() -> None:
    """A fresh event loop (between tests)."""
    for t in list(LOOP.timers):
        t.stop()
    LOOP.__init__()
    QSettings.store = {}
