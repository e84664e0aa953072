"""Write the HTML template `dvc plots show` uses (.dvc/config: plots.html_template), with Vega, Vega-Lite and
Vega-Embed inlined from the vl-convert-python package, so the charts draw on a machine with no network.

    python scripts/offline_plots_template.py [OUT]      # default: .dvc/plots/offline.html

DVC's own page loads those three libraries from a CDN; offline, every line chart is left blank without a word.
The template has no `{scripts}` placeholder, so DVC adds no CDN script tags to it; its `{plot_divs}` receive
DVC's charts, each of which calls the `vegaEmbed` the inlined bundle defines. Vega-Lite is pinned to the 5.x
line, the schema DVC writes its specs in. The libraries are BSD-3-Clause (https://github.com/vega).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import vl_convert

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".dvc" / "plots" / "offline.html"
VEGA_LITE = "5.21"  # DVC 3's vega templates declare https://vega.github.io/schema/vega-lite/v5.json

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Written by scripts/offline_plots_template.py: Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {embed},
         inlined so that no chart needs a network. -->
    <script type="text/javascript">
{bundle}
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def template() -> str:
    """The page, with DVC's placeholders `{refresh_tag}` and `{plot_divs}` left for DVC to fill."""
    versions = {
        "vega": vl_convert.get_vega_version(), "vega_lite": VEGA_LITE, "embed": vl_convert.get_vega_embed_version(),
    }
    page = PAGE
    for key, value in versions.items():
        page = page.replace("{" + key + "}", value)
    # Replaced last: the bundle is minified code that may hold any of the placeholders' spellings.
    return page.replace("{bundle}", vl_convert.javascript_bundle(vl_version=VEGA_LITE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(template())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
