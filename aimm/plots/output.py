"""Writing figures: self-contained HTML and static PNG / PDF / SVG through kaleido 1.x.

kaleido 1.x renders in a headless Chrome/Chromium that it drives through ``choreographer``.
choreographer looks at ``$BROWSER_PATH`` first, then for ``chromium`` / ``chrome`` on ``PATH``
and a few typical paths. :func:`find_browser` does the same search plus the places distributions
put the real binary (Debian: ``/usr/lib/chromium/chromium``), and exports the result as
``BROWSER_PATH`` so plotly's own ``fig.write_image`` works afterwards too. All static formats of
one :func:`export` call (and all figures of one :func:`export_figures` call) share one browser.

Without a browser, :func:`export_figures` (and so :func:`export`) writes the HTML files, skips
the static formats and prints ONE line per process saying so and how to get them
(:func:`usable_formats`); ``missing_browser="raise"`` raises :class:`BrowserNotFoundError` instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import plotly.graph_objects as go

from aimm.names import require_name

from aimm.plots.theme import WIDTHS, apply_paper_theme, get_meta
from aimm.runs import atomic_write_bytes

STATIC_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp")
ALL_FORMATS = ("html",) + STATIC_FORMATS
# checked after $BROWSER_PATH, PATH and choreographer's own search
BROWSER_CANDIDATES: tuple[str, ...] = (
    "/usr/bin/chromium",
    "/usr/lib/chromium/chromium",
    "/usr/bin/chromium-browser",
    "/usr/lib/chromium-browser/chromium-browser",
    "/snap/bin/chromium",
    "/usr/bin/google-chrome",
    "/usr/bin/google-chrome-stable",
    "/opt/google/chrome/chrome",
)
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = ("install one (Debian/Ubuntu: `apt-get install chromium`), or point BROWSER_PATH "
                "at a Chrome/Chromium executable; HTML export works without it "
                "(formats=('html',))")


SKIPPED_HINT = ("to get them, run `make setup` as root or with sudo (it installs Debian's "
                "chromium), or `apt-get install chromium`, or point BROWSER_PATH at a "
                "Chrome/Chromium executable")
_warned: dict[str, bool] = {"static_skipped": False}


class BrowserNotFoundError(RuntimeError):
    """Static export (PNG/PDF/SVG) needs a Chrome/Chromium and none was found."""


def _is_exe(path: str | os.PathLike | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def _choreographer_find() -> str | None:
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 best effort; our own search follows
        return None


def find_browser() -> str:
    """Path of the Chrome/Chromium kaleido will use; sets ``BROWSER_PATH`` to it.

    Raises :class:`BrowserNotFoundError` (naming the fix) when there is none.
    """
    env = os.environ.get("BROWSER_PATH")
    if env:
        if _is_exe(env):
            return env
        raise BrowserNotFoundError(
            f"BROWSER_PATH={env!r} is not an executable browser; static figure export "
            f"(kaleido) needs Chrome/Chromium: fix or unset BROWSER_PATH, or {INSTALL_HINT}")
    found = next((p for p in (shutil.which(n) for n in BROWSER_NAMES) if _is_exe(p)), None)
    found = found or _choreographer_find()
    found = found if _is_exe(found) else None
    found = found or next((p for p in BROWSER_CANDIDATES if _is_exe(p)), None)
    if not found:
        raise BrowserNotFoundError(
            "no Chrome/Chromium browser found (looked at $BROWSER_PATH, "
            f"{', '.join(BROWSER_NAMES)} on PATH, {', '.join(BROWSER_CANDIDATES)}); static figure "
            f"export (PNG/PDF/SVG through kaleido) needs one: {INSTALL_HINT}")
    os.environ["BROWSER_PATH"] = found
    return found


def browser_or_none() -> str | None:
    """:func:`find_browser`, or ``None`` when there is no usable browser."""
    try:
        return find_browser()
    except BrowserNotFoundError:
        return None


def usable_formats(formats: Iterable[str] | str) -> list[str]:
    """``formats`` without the static ones when no browser is found.

    Dropping any prints one line to stderr, once per process: which formats were skipped and
    how to get them (:data:`SKIPPED_HINT`).
    """
    formats = _normalise_formats(formats)
    static = [f for f in formats if f != "html"]
    if not static or browser_or_none():
        return formats
    if not _warned["static_skipped"]:
        _warned["static_skipped"] = True
        print(f"aimm: warning: no Chrome/Chromium found, so figures are written as HTML only and "
              f"{'/'.join(f.upper() for f in static)} were skipped; {SKIPPED_HINT}",
              file=sys.stderr, flush=True)
    return [f for f in formats if f == "html"]


def _run_async(coro_fn, *args: Any) -> Any:
    """Run ``coro_fn(*args)`` in its own thread and event loop (safe inside Jupyter's loop)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro_fn(*args))
        except BaseException as exc:  # noqa: BLE001 re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="aimm-kaleido", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def render_static(jobs: list[tuple[dict, dict]], timeout: float | None = 120) -> list[bytes]:
    """Render ``(figure dict, {format, width, height, scale})`` jobs in ONE browser session."""
    if not jobs:
        return []
    browser = find_browser()
    import kaleido
    from choreographer.errors import ChromeNotFoundError

    async def work() -> list[bytes]:
        async with kaleido.Kaleido(n=1, timeout=timeout, mathjax=False, path=browser) as k:
            return [await k.calc_fig(fig, opts=opts) for fig, opts in jobs]

    try:
        return _run_async(work)
    except ChromeNotFoundError as exc:
        raise BrowserNotFoundError(
            f"kaleido could not start {browser!r} ({exc}); {INSTALL_HINT}") from exc


def _normalise_formats(formats: Iterable[str] | str) -> list[str]:
    if isinstance(formats, str):
        formats = (formats,)
    out = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in ALL_FORMATS:
            raise ValueError(f"format {fmt!r}: choose from {', '.join(ALL_FORMATS)}")
        if fmt not in out:
            out.append(fmt)
    return out


def _prepare(fig: go.Figure, width: str | None) -> go.Figure:
    if width is not None and width not in WIDTHS:
        raise ValueError(f"width={width!r}: choose 'one' or 'two'")
    out = go.Figure(fig)  # a copy (also turns a FigureWidget into a Figure)
    return apply_paper_theme(out, width or get_meta(out, "aimm_width", "one"))


def export_figures(figures: Mapping[str, go.Figure], directory: str | Path,
                   formats: Iterable[str] | str = ("html", "png", "pdf", "svg"),
                   width: str | None = None, scale: float = 3,
                   missing_browser: str = "warn") -> dict[str, list[Path]]:
    """Export many figures (``{file stem: figure}``) into ``directory`` with one browser start.

    No browser: ``missing_browser="warn"`` skips the static formats (one line to stderr per
    process, :func:`usable_formats`); ``"raise"`` raises :class:`BrowserNotFoundError` before
    anything is written.
    """
    if missing_browser not in ("warn", "raise"):
        raise ValueError(f"missing_browser={missing_browser!r}: choose 'warn' or 'raise'")
    formats = _normalise_formats(formats) if missing_browser == "raise" else usable_formats(formats)
    directory = Path(directory)
    for name in figures:  # a file stem is one path component, never a way out of `directory`
        require_name(name, "figure name")
    prepared = {name: _prepare(fig, width) for name, fig in figures.items()}
    static = [f for f in formats if f != "html"]
    if static:
        find_browser()  # fail before writing anything
    written: dict[str, list[Path]] = {name: [] for name in prepared}
    jobs, targets = [], []
    for name, fig in prepared.items():
        base = directory / name
        for fmt in formats:
            target = base.with_name(base.name + "." + fmt)
            if fmt == "html":
                html = fig.to_html(include_plotlyjs=True, full_html=True,
                                   config={"displaylogo": False, "responsive": False})
                atomic_write_bytes(target, html.encode("utf-8"))
                written[name].append(target)
            else:
                fig_dict = fig.to_dict()
                opts = dict(format="jpeg" if fmt == "jpg" else fmt, width=fig.layout.width,
                            height=fig.layout.height, scale=scale)
                jobs.append((fig_dict, opts))
                targets.append((name, target))
    for (name, target), data in zip(targets, render_static(jobs)):
        if not data:
            raise RuntimeError(f"{target}: kaleido returned an empty image")
        atomic_write_bytes(target, data)
        written[name].append(target)
    # keep the order of `formats` per figure
    order = {fmt: i for i, fmt in enumerate(formats)}
    return {name: sorted(paths, key=lambda p: order[p.suffix[1:]]) for name, paths in written.items()}


def export(fig: go.Figure, path: str | Path,
           formats: Iterable[str] | str = ("html", "png", "pdf", "svg"),
           width: str | None = None, scale: float = 3, missing_browser: str = "warn") -> list[Path]:
    """Write ``path.with_suffix('.<fmt>')`` for each format; returns the paths written.

    The figure (not modified) is copied and themed for ``width`` (``"one"`` column 3.5 in,
    ``"two"`` columns 7 in; ``None``: the width it was built for). HTML embeds plotly.js (works
    offline); PNG is rendered at ``scale`` x the layout pixels (3: ~290 dpi); PDF and SVG are
    vector. Every file is written atomically. Static formats need Chrome/Chromium: without
    one they are skipped with a warning (``missing_browser="warn"``) or
    :class:`BrowserNotFoundError` is raised (``"raise"``).
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower().lstrip(".") in ALL_FORMATS else path
    return export_figures({stem.name: fig}, stem.parent, formats=formats, width=width,
                          scale=scale, missing_browser=missing_browser)[stem.name]
