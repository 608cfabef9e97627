"""`aekt plots`: the charts dvc.yaml declares as one HTML page that opens offline, optionally checked
in headless Chromium (every chart drawn, axes listed) with a screenshot."""

from pathlib import Path

import click

from stages.common import stage


@click.command("plots")
@click.argument("revs", nargs=-1)
@click.option("--out", "out_dir", default="dvc_plots", show_default=True, type=click.Path(file_okay=False),
              help="Folder for index.html and the images it shows (DVC's own default folder).")
@click.option("--check", is_flag=True,
              help="Open the page in headless Chromium with the network off and fail if any chart is blank.")
@click.option("--screenshot", default=None, type=click.Path(dir_okay=False),
              help="With --check: also save a full-page PNG screenshot here [default: none].")
@click.option("--chromium", default=None, type=click.Path(dir_okay=False),
              help="Chromium binary for --check [default: chromium, chromium-browser or google-chrome on PATH].")
@stage
def main(revs: tuple[str, ...], out_dir: str, check: bool, screenshot: str | None, chromium: str | None) -> None:
    """Render `dvc plots show` (or `dvc plots diff REVS...`: experiments, branches, commits) with the
    chart libraries inlined, so the page needs no network. Run from the repository root."""
    from pipeline.plots_page import PlotsPageError, build_page, check_page

    if screenshot and not check:
        raise click.UsageError("--screenshot needs --check (the screenshot is taken by the headless check).")
    index = build_page(Path.cwd(), Path(out_dir), revs)
    click.echo(f"wrote {index} (offline: Vega, Vega-Lite and vega-embed inlined)")
    if not check:
        return
    charts = check_page(index, Path(screenshot) if screenshot else None, chromium)
    for chart in charts:
        axes = "; ".join(label.split(" with values")[0] for label in chart.axes)
        click.echo(f"  {chart.id}: {chart.status}, {chart.marks} marks; {axes}")
    blank = [c.id for c in charts if c.blank]
    if not charts or blank:
        names = ", ".join(blank) or "no chart found"
        raise PlotsPageError(f"{index}: {len(blank)} of {len(charts)} charts are blank ({names}); check that "
                             "`dvc repro` wrote the plot files dvc.yaml declares.")
    click.echo(f"all {len(charts)} charts drawn" + (f"; screenshot {screenshot}" if screenshot else ""))
