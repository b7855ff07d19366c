"""The report opens in a real (headless) browser, offline, with every plot drawn and no JS error.

Needs Debian's `chromium` package; skipped with that reason when it is absent. The e2e test
loads `render` from this file to check a report of a study made by real workers.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless check needs chromium (apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,900"]


def load_sibling(name: str) -> ModuleType:
    """Import a helper test module of this directory by path (works under any pytest import mode)."""
    spec = importlib.util.spec_from_file_location(f"_hpopt_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class Rendered:
    dom: str
    console: list[str]  # messages the page wrote to its JS console (errors included)
    screenshot: Path | None


def _chromium(url: str, action: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", action, url],
                              capture_output=True, text=True, timeout=120)


def render(page: Path, screenshot: Path | None = None) -> Rendered:
    """Load a file in headless Chromium: the DOM after scripts ran, and a PNG when asked."""
    url = page.resolve().as_uri()
    runs = [_chromium(url, "--dump-dom")]
    if screenshot is not None:
        runs.append(_chromium(url, f"--screenshot={screenshot}"))
    console = [line for run in runs for line in run.stderr.splitlines() if ":CONSOLE" in line]
    return Rendered(runs[0].stdout, console, screenshot)


def assert_report_renders(index: Path, n_plots: int, tmp: Path) -> Rendered:
    """Every figure became a plotly SVG, nothing was logged to the console, a PNG came out."""
    shot = render(index, tmp / "index-screenshot.png")
    assert shot.console == [], "JS console output:\n" + "\n".join(shot.console)
    graphs = re.findall(r'class="[^"]*js-plotly-plot[^"]*"', shot.dom)
    assert len(graphs) == n_plots, f"expected {n_plots} drawn plots, found {len(graphs)}"
    assert shot.dom.count('class="main-svg"') >= n_plots
    assert shot.screenshot is not None and shot.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return shot


@needs_chromium
def test_report_renders_offline_without_js_errors(tmp_path: Path) -> None:
    from hpopt.results.report import write_report

    write_report(load_sibling("test_results").make_study(20), tmp_path / "report")
    assert_report_renders(tmp_path / "report" / "index.html", 6, tmp_path)


@needs_chromium
def test_the_check_itself_catches_a_js_error(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    assert any("Uncaught Error: boom" in line for line in render(page).console)
