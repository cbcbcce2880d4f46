"""``routesae dashboard RUN``: start the Streamlit app in ``dashboards/`` on the stored analysis of RUN.

The app lives at the repository root next to the ``routesae`` package (an editable install or a
checkout); the run reaches it through the ``ROUTESAE_RUN`` environment variable (and the model of
the token explorer, optionally, through ``ROUTESAE_MODEL``). Binds 127.0.0.1 unless ``host`` says otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import routesae

RUN_ENV = "ROUTESAE_RUN"
MODEL_ENV = "ROUTESAE_MODEL"


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
            "--client.toolbarMode", "minimal"]


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
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0
