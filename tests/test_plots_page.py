"""The offline plots page without a browser: the page template inlines the chart libraries (no
network reference), and the blank-chart rule that `aekt plots --check` applies to what Chromium drew.
The browser check itself runs on a real `dvc repro` in tests/test_pipeline_dvc.py."""

from pipeline.plots_page import Chart, _ChartParser, drawn, template


def test_template_inlines_the_libraries_and_leaves_dvc_only_the_plot_placeholder() -> None:
    page = template()
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC adds no CDN <script src> tags
    assert "window.vegaEmbed" in page and len(page) > 300_000
    assert "<script src=" not in page


def test_a_zero_width_bar_is_not_drawn() -> None:
    assert not drawn("M0,5.88h0v23.5h0Z")  # vega's bar from 0 on a log axis: in the DOM, 0 px wide
    assert drawn("M0,5.88h120.5v23.5h-120.5Z")
    assert drawn("M1,2L3,4L5,6") and drawn("M2.5,0A2.5,2.5,0,1,1,-2.5,0")
    assert not drawn("") and not drawn("M0,0") and not drawn("MNaN,NaNLNaN,NaN")


def test_parser_counts_marks_per_chart_and_reads_the_axes() -> None:
    dom = ('<div id="a" data-aekt-rendered="ok"><svg><g class="mark-group role-axis" aria-label="X-axis titled '
           "'epoch' for a linear scale\"><path d=\"M0,0L10,0\"></path></g><g class=\"mark-line role-mark\">"
           '<path d="M1,2L3,4"></path></g></svg></div>'
           '<div id="b" data-aekt-rendered="ok"><svg><g class="mark-rect role-mark"><path d="M0,1h0v2h0Z"></path>'
           '</g></svg></div><div id="c"></div>')
    parser = _ChartParser({"a", "b", "c"})
    parser.feed(dom)
    a, b, c = parser.charts
    assert (a.marks, a.axes, a.blank) == (1, ["X-axis titled 'epoch' for a linear scale"], False)
    assert b.blank and b.marks == 0  # rendered, but nothing visible
    assert c == Chart("c") and c.blank  # never rendered
