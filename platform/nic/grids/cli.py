"""`nic grids show|ls`: look at a grid store without writing code."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nic.storage import display, local_path, publish


def add_commands(subparsers: argparse._SubParsersAction, name: str) -> None:
    """Register `nic <name> show` and `nic <name> ls` (called by nic.cli.main for COMMAND_GROUPS)."""
    parser = subparsers.add_parser(name, help="Look at feature grids: list them, draw one.",
                                   description="Look at a grid store written by nic compress.")
    sub = parser.add_subparsers(dest="grids_command", metavar="<command>")
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])

    show = sub.add_parser("show", help="Draw a slide's thumbnail beside its grid projected to RGB by PCA, "
                          "or one channel (a head map) over the thumbnail.")
    show.add_argument("--grids", type=local_path, required=True, help="Grid store (the --out of nic compress).")
    show.add_argument("--slide", required=True, help="Slide id (see `nic grids ls`).")
    show.add_argument("--out", type=local_path, required=True, help="PNG file to write (a path or a URI).")
    show.add_argument("--transform", type=int, default=0, choices=range(8), metavar="0-7",
                      help="Which of the 8 rotations/flips to draw (needs dihedral compression for 1-7).")
    show.add_argument("--slide-path", default=None,
                      help="Where the slide file is now, if it moved since compression.")
    show.add_argument("--thumbnail-px", type=int, default=1024, help="Longest side of the thumbnail.")
    show.add_argument("--channel", default=None, metavar="NAME",
                      help="Draw this per-tile value over the thumbnail with a colour bar instead of the PCA "
                      "picture: a head column of a grid made with nic compress --heads (e.g. head:tumour, "
                      "head:cells=lymphocyte) or embedding:<i>. An unknown name lists the grid's names.")
    show.set_defaults(handler=_show)

    ls = sub.add_parser("ls", help="List the slides of a grid store with status, grid shape and tiles.")
    ls.add_argument("--grids", type=local_path, required=True, help="Grid store (the --out of nic compress).")
    ls.set_defaults(handler=_ls)


def _show(args: argparse.Namespace) -> int:
    from nic.grids.schema import GridError
    from nic.grids.show import render_grid_png

    try:
        if args.channel:
            from nic.grids.show_channel import render_channel_png

            path = render_channel_png(args.grids, args.slide, args.channel, args.out, transform=args.transform,
                                      thumbnail_px=args.thumbnail_px, slide_path=args.slide_path)
        else:
            path = render_grid_png(args.grids, args.slide, args.out, transform=args.transform,
                                   thumbnail_px=args.thumbnail_px, slide_path=args.slide_path)
    except GridError as exc:
        print(f"nic grids show: {exc}", file=sys.stderr)
        return 2
    publish(path)
    print(display(path))
    return 0


def _ls(args: argparse.Namespace) -> int:
    from nic.grids.reader import list_slides, read_manifest
    from nic.grids.schema import GridError

    try:
        complete = set(list_slides(args.grids))
        manifest = read_manifest(args.grids)
    except GridError as exc:
        print(f"nic grids ls: {exc}", file=sys.stderr)
        return 2
    print(f"{'slide_id':<32} {'status':<8} {'grid':>11} {'tiles':>8}  reason")
    row: Any  # a manifest row: its fields are typed by the manifest's schema, not by pandas
    for row in manifest.itertuples(index=False):
        shape = f"{int(row.rows)}x{int(row.cols)}" if _known(row.rows) and _known(row.cols) else "-"
        tiles = str(int(row.tiles)) if _known(row.tiles) else "-"
        has_grid = row.status != "failed" and row.error_kind != "duplicate"  # a repeated input has none
        mark = "" if (row.slide_id in complete) == has_grid else "  (file/manifest disagree)"
        print(f"{row.slide_id:<32} {row.status:<8} {shape:>11} {tiles:>8}  {row.reason or ''}{mark}")
    return 0


def _known(value) -> bool:
    """Not None and not NaN (pandas turns missing integers of failed slides into NaN)."""
    return value is not None and value == value
