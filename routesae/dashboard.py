"""``routesae dashboard RUN``: start the Streamlit app in ``dashboards/`` on the stored analysis of RUN.

The app lives at the repository root next to the ``routesae`` package (an editable install or a
checkout); the run reaches it through the ``ROUTESAE_RUN`` environment variable (and the model of
the token explorer, optionally, through ``ROUTESAE_MODEL``). Binds 127.0.0.1 unless ``host`` says otherwise.

Stopping: streamlit runs as a child in its own process group (:func:`supervise`). SIGTERM, SIGINT and
SIGHUP sent to the launcher are forwarded to that group; the launcher waits for streamlit (SIGKILL to
the group after ``STOP_GRACE_S``) and exits with its status, so stopping ``routesae dashboard``
(``kill PID``, Ctrl+C, closing the terminal, a service manager) frees the port. Why not ``os.execv``
into streamlit: it would leave nothing to escalate to SIGKILL when streamlit hangs on shutdown, to
take down anything streamlit starts, or to work the same on Windows. Only SIGKILL of the launcher
itself (which no process can catch) leaves streamlit running.

The dashboard's tables are shown without the browser's CSV download / clipboard copy of
``st.dataframe`` (``client.disableDataExport``): that export would hand raw corpus text (formula
injection, see routesae/report/tables.py) to a spreadsheet; the Export page offers every table as
CSV through the package's one quoting CSV writer instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import routesae

RUN_ENV = "ROUTESAE_RUN"
MODEL_ENV = "ROUTESAE_MODEL"
STOP_GRACE_S = 10.0  # after a forwarded signal, seconds streamlit gets before SIGKILL
FORWARDED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))


class DashboardError(ValueError):
    """The dashboard cannot start; the message says what to change."""


def dashboards_dir() -> Path:
    """``dashboards/`` beside the package; a clear error when the package is installed without it."""
    d = Path(routesae.__file__).resolve().parents[1] / "dashboards"
    if not (d / "app.py").is_file():
        raise DashboardError(f"the dashboard app was not found at {d / 'app.py'}: it ships with the source "
                             f"checkout, not the wheel; install routesae in editable mode from the repository "
                             f"(`pip install -e .`)")
    return d


def command(run: str | Path, port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line."""
    app = dashboards_dir() / "app.py"
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(int(port)),
            "--server.address", host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal", "--client.disableDataExport", "true"]


def check_run(run: str | Path) -> Path:
    run = Path(run).expanduser().resolve()
    ana = run / "analysis"
    if not ana.is_dir() or not (any(ana.glob("*.parquet")) or (ana / "summary.json").is_file()):
        raise DashboardError(f"{ana} holds no analysis; run `routesae analyze {run}` first")
    return run


def launch(run: str | Path, port: int = 8501, host: str = "127.0.0.1", model: str | None = None) -> int:
    """Run the dashboard in the foreground until interrupted; returns streamlit's exit status.

    ``model``: the checkpoint of the token explorer (default: the one the analysis recorded).
    """
    run = check_run(run)
    if not 0 < int(port) < 65536:
        raise DashboardError(f"--port {port} must be between 1 and 65535")
    env = {**os.environ, RUN_ENV: str(run)}
    if model:
        env[MODEL_ENV] = str(model)
    cmd = command(run, port, host)
    print(f"routesae dashboard: http://{host}:{port} (run {run}; Ctrl+C to stop)", file=sys.stderr)
    return supervise(cmd, env)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the child's process group (the child alone where there are no groups)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        else:  # Windows: no groups, and terminate is TerminateProcess
            proc.terminate()
    except (ProcessLookupError, PermissionError):  # already gone
        pass


def supervise(cmd: list[str], env: dict[str, str], grace: float = STOP_GRACE_S) -> int:
    """Run ``cmd`` as a child in its own process group until it exits; return its exit status.

    SIGTERM/SIGINT/SIGHUP received meanwhile are forwarded to the child's group; ``grace`` seconds
    after the first one, the group is SIGKILLed. A child killed by signal N gives 128 + N (the shell's
    convention). Signal handlers are installed only in the main thread (elsewhere Python forbids it).
    """
    received: list[int] = []
    proc: subprocess.Popen | None = None
    killer: threading.Timer | None = None

    def forward(sig: int, _frame) -> None:
        nonlocal killer
        received.append(sig)
        if proc is None:  # not started yet: it is signalled as soon as it is
            return
        _signal_group(proc, sig)
        if killer is None:
            killer = threading.Timer(grace, _signal_group, (proc, getattr(signal, "SIGKILL", signal.SIGTERM)))
            killer.daemon = True
            killer.start()

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED} if main else {}
    try:
        group = {"process_group": 0} if sys.version_info >= (3, 11) and os.name == "posix" else (
            {"start_new_session": True} if os.name == "posix" else {})
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, **group)
        if received:
            forward(received[-1], None)
        rc = proc.wait()
    finally:
        if killer is not None:
            killer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc
