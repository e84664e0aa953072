"""`dvc plots show` draws its charts with no network: the repo's HTML template (.dvc/config plots.html_template)
inlines Vega, Vega-Lite and Vega-Embed, where DVC's own page loads them from a CDN. Checked in headless Chromium
with every host unresolvable and a dead proxy, against DVC's own page as the control."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dvc_render.html import PAGE_HTML

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium (apt-get install chromium; .ci/run installs it)"
)


def show_plots(out: Path, *template: str) -> str:
    subprocess.run(
        [str(BIN / "dvc"), "plots", "show", "-o", str(out), *template], cwd=REPO, check=True, capture_output=True,
    )
    return (out / "index.html").read_text()


def drawn_offline(page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran, in a Chromium that can reach no host."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout


def test_the_committed_template_is_the_packaged_libraries_unchanged():
    spec = importlib.util.spec_from_file_location("offline_plots_template", REPO / "scripts" / "offline_plots_template.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.DEFAULT_OUT.read_text() == script.template(), "regenerate: python scripts/offline_plots_template.py"


def test_every_chart_of_dvc_plots_show_renders_in_a_browser_with_no_network(tmp_path):
    page = show_plots(tmp_path / "offline")
    assert not re.search(r"<script[^>]+src=", page), "the page must load no script from elsewhere"
    charts = page.count("vegaEmbed('#")
    assert charts >= 7  # the loss curves of four trainings, the UNet's val loss, the evaluation's charts
    dom = drawn_offline(tmp_path / "offline" / "index.html", tmp_path / "profile")
    # vega-embed renders each chart as an SVG of class "marks"; the loss curves are line marks.
    assert dom.count('class="marks"') == charts
    assert len(re.findall(r'class="mark-line role-mark', dom)) >= charts

    # The control: DVC's own page, whose libraries come from a CDN, draws nothing here.
    (tmp_path / "cdn.html").write_text(PAGE_HTML)
    cdn_page = show_plots(tmp_path / "cdn", "--html-template", str(tmp_path / "cdn.html"))
    assert "cdn.jsdelivr.net" in cdn_page and cdn_page.count("vegaEmbed('#") == charts
    assert drawn_offline(tmp_path / "cdn" / "index.html", tmp_path / "profile").count('class="marks"') == 0
