"""The README's dashboard screenshots, taken from a real server in headless Chromium.

    python analyses/dashboard_screenshots.py [RUN] [--feature N] [--out docs/figures]

RUN defaults to the full demo's RouteSAE run (``routesae demo`` first). The feature page shows
``--feature`` (default: the interpretable latent that fires most often in the analysis; the README
uses ``--feature 48``, a math latent of "=" and ">>" in worked calculations); the
experts page opens at its default layer. Writes ``dashboard-feature.png`` and
``dashboard-experts.png`` (1400 x 1000 pixels) into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routesae import dashboard  # noqa: E402
from routesae.browser import Browser, find_chromium  # noqa: E402


def default_feature(run: Path) -> int:
    """The interpretable latent with the most firing tokens in RUN/analysis."""
    import pandas as pd

    lat = pd.read_parquet(run / "analysis" / "latents.parquet")
    pick = lat[lat["interpretable"]] if lat["interpretable"].any() else lat
    return int(pick.sort_values("count", ascending=False).iloc[0]["latent"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="runs/demo/full/routesae", help="relative to the repository root")
    ap.add_argument("--feature", type=int)
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    args = ap.parse_args()
    os.chdir(ROOT)  # paths in the pages are shown relative to it
    run, out = Path(args.run), Path(args.out)
    if find_chromium() is None:
        raise SystemExit("no chromium on PATH; apt-get install -y chromium")
    feature = args.feature if args.feature is not None else default_feature(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(dashboard.command(run, port=port), env={**os.environ, dashboard.RUN_ENV: str(run)},
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        browser = Browser(out / ".chrome-profile")
        browser.page_when(f"{url}/features?feature={feature}", f"Latent {feature}", timeout=180)
        browser.screenshot(out / "dashboard-feature.png")
        browser.page_when(f"{url}/experts", "Specialisation", timeout=180)
        browser.screenshot(out / "dashboard-experts.png")
        print(f"latent {feature}: {out / 'dashboard-feature.png'}, {out / 'dashboard-experts.png'}")
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=60)
        import shutil

        shutil.rmtree(out / ".chrome-profile", ignore_errors=True)


if __name__ == "__main__":
    main()
