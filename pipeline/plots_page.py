"""The plots page: ``dvc plots show`` (or ``dvc plots diff``) rendered into one HTML page that opens
with no network, and a headless-Chromium check that every chart on it is drawn.

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN, so offline it shows empty boxes.
Here the page template inlines the same libraries from the ``vl-convert-python`` wheel (one ~0.9 MB
script, no download at run time) and has no ``{scripts}`` placeholder, so DVC adds no CDN tags. Each
chart is drawn as SVG and marks its element ``data-aekt-rendered="ok"`` (or the error): a headless
browser's DOM then tells a drawn chart from a blank one, and its axes' ``aria-label``s tell which
field is on which axis and whether the scale is linear or log.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from pipeline.errors import UserError

VEGA_LITE = "5.21"  # DVC's templates declare the Vega-Lite v5 schema
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>AEKT pipeline plots</title>
<script>__BUNDLE__</script>
<script>
// Every chart as SVG, and its outcome on its element (see pipeline/plots_page.py).
(function () {
  const embed = window.vegaEmbed;
  window.vegaEmbed = function (target, spec, options) {
    const node = document.querySelector(target);
    const opts = Object.assign({renderer: "svg", actions: {export: true, source: false, compiled: false,
                                                          editor: false}}, options || {});
    return embed(target, spec, opts)
      .then(function (result) { node.setAttribute("data-aekt-rendered", "ok"); return result; })
      .catch(function (err) { node.setAttribute("data-aekt-rendered", "error: " + err); throw err; });
  };
})();
</script>
<style>
body { font-family: sans-serif; margin: 1em 2em; }
table { border-spacing: 15px; }
img { max-width: 900px; }
</style>
</head>
<body>
<h1>AEKT pipeline plots</h1>
<p>Rendered by <code>aekt plots</code> from the files <code>dvc.yaml</code> declares; opens offline.</p>
{plot_divs}
</body>
</html>
"""


class PlotsPageError(UserError):
    """The page could not be built, or a chart on it is blank."""


def template() -> str:
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    assert "{plot_divs}" not in bundle and "</script>" not in bundle, "bundle would break the page"
    return PAGE.replace("__BUNDLE__", bundle)


def build_page(repo: Path, out_dir: Path, revs: tuple[str, ...] = ()) -> Path:
    """``dvc plots show`` (no ``revs``) or ``dvc plots diff revs`` into ``out_dir``/index.html."""
    template_path = repo / ".dvc" / "tmp" / "aekt-plots-template.html"
    template_path.parent.mkdir(parents=True, exist_ok=True)
    template_path.write_text(template(), encoding="utf-8")
    command = ["dvc", "plots", "diff", *revs] if revs else ["dvc", "plots", "show"]
    command += ["--html-template", str(template_path), "-o", str(out_dir)]
    dvc = shutil.which("dvc")
    if dvc is None:
        raise PlotsPageError("`dvc` is not on PATH; activate the environment the project is installed in "
                             "(pip install -e .) and rerun `aekt plots`.")
    proc = subprocess.run([dvc, *command[1:]], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PlotsPageError(f"`{' '.join(command)}` failed in {repo}: {proc.stderr.strip()[-800:]} "
                             "Run it from the repository root after `dvc repro` has written the plots.")
    index = out_dir / "index.html"
    remote = re.findall(r"""(?:src|href)\s*=\s*["']((?:https?:)?//[^"']+)""", index.read_text(encoding="utf-8"))
    if remote:
        raise PlotsPageError(f"{index} references the network ({remote[0]}); it would be blank offline.")
    return index


@dataclass
class Chart:
    """One chart of the page as the browser drew it."""

    id: str
    status: str = "not rendered"
    marks: int = 0  # drawn data marks (paths with geometry), legends and axes excluded
    axes: list[str] = field(default_factory=list)  # the axes' aria-labels, e.g. "X-axis titled 'epoch' ..."

    @property
    def blank(self) -> bool:
        return self.status != "ok" or self.marks == 0


class _ChartParser(HTMLParser):
    """The charts (DVC's chart divs, by id) and what is drawn inside each."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self, ids: set[str]) -> None:
        super().__init__()
        self.ids, self.charts = ids, []
        self.stack: list[tuple[str, str, Chart | None]] = []  # (tag, class, the chart it opens)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        chart = self._chart()
        if a.get("id") in self.ids:
            self.charts.append(Chart(a["id"], a.get("data-aekt-rendered", "not rendered")))
        elif chart is not None and tag == "g" and "role-axis" in a.get("class", "") and a.get("aria-label"):
            chart.axes.append(a["aria-label"])
        elif chart is not None and tag == "path" and drawn(a.get("d", "")) \
                and any("role-mark" in cls for _, cls, _ in self.stack):
            chart.marks += 1
        if tag not in self.VOID:
            opened = self.charts[-1] if a.get("id") in self.ids else None
            self.stack.append((tag, a.get("class", ""), opened))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def _chart(self) -> Chart | None:
        return next((chart for _, _, chart in reversed(self.stack) if chart is not None), None)


def drawn(d: str) -> bool:
    """Whether an SVG path has visible extent. Vega draws a bar it cannot place (a bar from 0 on a
    log axis) as ``M0,y h0 v20 h0 Z``: present in the DOM, zero pixels wide."""
    if not d.strip() or "NaN" in d or "Infinity" in d:
        return False
    if re.search(r"[hv]", d):  # a bar: M x,y h W v H h -W Z
        widths = [float(v) for v in re.findall(r"h(-?[\d.e+-]+)", d)]
        heights = [float(v) for v in re.findall(r"v(-?[\d.e+-]+)", d)]
        return any(widths) and any(heights)
    return len(set(re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", d))) > 1  # a line or a symbol


def chart_ids(index: Path) -> list[str]:
    """The ids of the Vega charts DVC put on the page (``vegaEmbed('#id', spec)``)."""
    return re.findall(r"vegaEmbed\('#([^']+)'", index.read_text(encoding="utf-8"))


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def check_page(index: Path, screenshot: Path | None = None, chromium: str | None = None,
               timeout: float = 120.0) -> list[Chart]:
    """Open ``index`` in headless Chromium, with the network off, and return every chart as drawn;
    optionally save a full-page screenshot."""
    browser = chromium or find_chromium()
    if browser is None:
        raise PlotsPageError("no Chromium found for the headless check (looked for " + ", ".join(CHROMIUM_NAMES) +
                             "); install Debian's `chromium` package or pass --chromium PATH.")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network: offline means offline
             "--virtual-time-budget=30000", "--window-size=1300,1000"]
    url = index.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    if dom.returncode != 0 or "<body" not in dom.stdout:
        raise PlotsPageError(f"{browser} could not open {index}: {dom.stderr.strip()[-600:]}")
    parser = _ChartParser(set(chart_ids(index)))
    parser.feed(dom.stdout)
    if screenshot is not None:
        height = 700 * max(4, len(parser.charts)) + 900 * len(re.findall(r"<img ", dom.stdout))
        subprocess.run([*flags[:-1], f"--window-size=1300,{height}", f"--screenshot={screenshot.resolve()}", url],
                       capture_output=True, text=True, timeout=timeout, check=False)
    return parser.charts
