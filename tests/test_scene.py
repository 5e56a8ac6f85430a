"""The scene objective's targets: which cell names which object, and the centre votes around it."""

from __future__ import annotations

import torch

from vistune.scene import ATTRIBUTES, cell_offsets, cell_targets


def _scene(*objects):
    keys = ("color", "shape", "size", "x", "y")
    return {"width": 64, "height": 64, "objects": [dict(zip(keys, o, strict=True)) for o in objects]}


def test_the_centre_cell_names_the_object_and_its_neighbours_vote_for_its_centre():
    scene = _scene(("blue", "star", "large", 20.0, 44.0), ("red", "circle", "small", 34.0, 44.0))
    targets, (offsets, near) = cell_targets(scene, (8, 8)), cell_offsets(scene, (8, 8))
    star, circle = 5 * 8 + 2, 5 * 8 + 4  # (row, column) (5, 2) and (5, 4)
    vocab = list(ATTRIBUTES.values())
    assert targets[star].tolist() == [vocab[0].index("blue") + 1, vocab[1].index("star") + 1, 2]
    assert targets[circle].tolist() == [vocab[0].index("red") + 1, vocab[1].index("circle") + 1, 1]
    assert int((targets[:, 0] > 0).sum()) == 2
    # the centre in cell sides from each cell's corner: (2.5, 5.5) for the star, (4.25, 5.5) for the circle
    torch.testing.assert_close(offsets[star], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(offsets[4 * 8 + 1], torch.tensor([1.5, 1.5]))  # the star's upper-left cell
    # cell (5, 3) lies between them and votes for the nearer centre, the circle's
    torch.testing.assert_close(offsets[5 * 8 + 3], torch.tensor([1.25, 0.5]))
    assert int(near.sum()) == 9 + 9 - 3 and not near[0]
