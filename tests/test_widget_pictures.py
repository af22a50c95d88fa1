"""Every lecture widget has a stored picture of its starting state, for readers without a kernel.

A widget is blank on GitHub, nbviewer or in a PDF; the markdown cell before it shows what it
draws (``scripts/widget_pictures.py`` makes the pictures).
"""

import base64
import io
import json
import re
from pathlib import Path

import matplotlib.image
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
WIDGET_CALL = re.compile(r"explorer\(|widgets\.|interact\(")


def course_meta(cell) -> dict:
    return cell.get("metadata", {}).get("course", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_widget_has_a_picture_of_its_starting_state(path):
    cells = json.loads(path.read_text())["cells"]
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or not WIDGET_CALL.search(source):
            continue
        name = course_meta(cell).get("widget")
        assert name, f"{path.name} cell {index} builds a widget but is not marked {{'widget': NAME}}"
        picture = cells[index - 1]
        assert course_meta(picture).get("widget_picture") == name, \
            f"{path.name} cell {index}: the cell before the widget must show its picture"
        assert f"(attachment:{name}.png)" in "".join(picture["source"])
        encoded = picture.get("attachments", {}).get(f"{name}.png", {}).get("image/png")
        assert encoded, f"{path.name}: no picture stored; run scripts/widget_pictures.py {path}"
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(encoded)), format="png")
        assert image.shape[0] >= 200 and image.shape[1] >= 300, image.shape
        assert image[..., :3].std() > 0.05, "the stored picture is blank"


def test_widget_cells_are_found():
    found = [path.name for path in NOTEBOOKS
             if any(course_meta(c).get("widget") for c in json.loads(path.read_text())["cells"])]
    assert {"01_autoencoders.ipynb", "02_transposed_convolution.ipynb",
            "03_variational_autoencoders.ipynb"} <= set(found)
