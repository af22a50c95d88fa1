"""Store each lecture widget's starting picture in its notebook, for readers without a kernel.

A widget needs a running kernel: on GitHub, nbviewer or in a PDF it is a blank space. So every
widget cell, marked ``{"course": {"widget": NAME}}`` (``NAME`` is the variable holding the widget,
which has a ``.snapshot()`` method returning PNG bytes), is preceded by a markdown cell marked
``{"course": {"widget_picture": NAME}}`` that shows ``attachment:NAME.png``. This script runs each
notebook (with nbclient, in the budget asked for) up to its last widget cell, asks every widget for
its snapshot and stores it as that markdown cell's attachment. Outputs are not saved.

    python scripts/widget_pictures.py --budget classroom            # every notebook with a widget
    python scripts/widget_pictures.py notebooks/02_transposed_convolution.ipynb

``tests/test_widget_pictures.py`` checks that every widget has its picture.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def widget_cells(notebook: dict) -> list[tuple[int, str]]:
    """(index, widget name) of every cell marked as a widget."""
    return [(i, cell["metadata"]["course"]["widget"]) for i, cell in enumerate(notebook["cells"])
            if cell.get("metadata", {}).get("course", {}).get("widget")]


def picture_cell(notebook: dict, name: str) -> dict:
    for cell in notebook["cells"]:
        if cell.get("metadata", {}).get("course", {}).get("widget_picture") == name:
            return cell
    raise SystemExit(f"no markdown cell marked widget_picture={name!r}")


def snapshots(path: Path, budget: str, timeout: int) -> dict[str, bytes]:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    marked = widget_cells(notebook)
    last = marked[-1][0]
    notebook.cells = notebook.cells[: last + 1]
    for _, name in marked:  # one extra cell per widget prints its picture as base64
        notebook.cells.append(nbformat.v4.new_code_cell(
            f"import base64\nprint('{name}:' + base64.b64encode({name}.snapshot()).decode())"))
    os.environ["COURSE_BUDGET"] = budget
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    pictures = {}
    for cell in notebook.cells[last + 1:]:
        text = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout").strip()
        name, _, encoded = text.partition(":")
        pictures[name] = base64.b64decode(encoded)
    return pictures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--budget", default="classroom")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        notebook = json.loads(path.read_text())
        if not widget_cells(notebook):
            continue
        print(f"{path.name}: running up to the last widget ({args.budget} budget) ...", flush=True)
        for name, png in snapshots(path, args.budget, args.timeout).items():
            cell = picture_cell(notebook, name)
            cell["attachments"] = {f"{name}.png": {"image/png": base64.b64encode(png).decode()}}
            print(f"  {name}: {len(png):,} bytes")
        path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
