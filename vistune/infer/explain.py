"""Where in the image an answer came from: relevance maps over the vision tower's grid.

An answer (the model's own greedy one, or one given) is scored by its log-probability given the
conversation and the images, teacher-forced. Its relevance is then spread over the tower's grid of
cells (a ViT's patches, a CNN's feature map), one map per image:

- `gradient`: gradient x input on the tower's cell features: d log P(answer) / d feature, times the
  feature, summed over the feature width. One forward and one backward pass.
- `integrated`: integrated gradients on the same features, from the features of the image blanked out
  (filled with its median colour) to its own, with `steps` midpoint steps. The cells' values add up to
  log P(answer | image) - log P(answer | blank image).
- `occlusion`: each cell's square of pixels is filled with the image's median colour (in most pictures
  its background), and the drop in log P(answer) is the cell's relevance. One forward pass per cell, in
  batches; model-agnostic, and what the deletion curve (`deletion_curve`) measures against.

Every projector reads the tower's cells, so every projector is mapped through them: `linear` and
`mlp2x_gelu` make one image token per cell, `pixel_shuffle` one per f x f block of cells, and set-pooling
projectors (`resampler`, an extension's) mix every cell into every token; relevance taken on the cells
before the projector says where in the image for all of them (`token_layout` says which). A CLIP CLS
token has no place in the image: its share of the gradient is reported apart, not drawn.

Positive values support the answer, negative ones speak against it. Maps are over the square the tower
sees (the image squared by the tower's `preprocess`); `Explanation.cell_box` gives a cell's pixels there.
"""

from __future__ import annotations

import argparse
import io
import json
import textwrap
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from vistune.data.records import IMAGE_PLACEHOLDER, Turn
from vistune.infer.context import context_length
from vistune.infer.generate import Generator
from vistune.model.preprocess import to_square
from vistune.model.projector import Linear as LinearProjector
from vistune.model.projector import MLP2xGelu, PixelShuffle, Resampler
from vistune.model.vlm import MODEL_FILE

METHODS = ("gradient", "integrated", "occlusion")


@dataclass
class Explanation:
    """Relevance maps of one answer, one per image of the conversation.

    Attributes:
        turns: the conversation up to the question (it ends with the user turn answered).
        answer: the answer explained.
        generated: whether the answer is the model's own (greedy), not one given.
        method: one of METHODS.
        maps: per image, (h, w) float32 relevance over the tower's grid, top row first.
        squares: per image, the square the tower sees (the maps lie over it).
        logprob: log P(answer | conversation, images).
        seconds: what computing the maps took (the answer's generation excluded).
        layout: how the projector's tokens lie on the grid (`token_layout`).
        cls: per image, the CLS token's gradient relevance (towers that keep it; gradient methods).
    """

    turns: list[Turn]
    answer: str
    generated: bool
    method: str
    maps: list[np.ndarray]
    squares: list[Image.Image]
    logprob: float
    seconds: float
    layout: str
    cls: list[float] = field(default_factory=list)

    @property
    def question(self) -> str:
        """The last user turn's text, without its image placeholders."""
        return self.turns[-1].content.replace(IMAGE_PLACEHOLDER, "").strip()

    def cell_box(self, image: int, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the pixels of a cell in the image's square (x1, y1 exclusive)."""
        return cell_box(self.squares[image].size[0], self.maps[image].shape, row, col)

    def peak(self, image: int = 0) -> tuple[int, int]:
        """(row, col) of the most relevant cell of an image's map."""
        grid = self.maps[image]
        row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
        return int(row), int(col)

    def to_json(self) -> dict:
        """The explanation as JSON: answer, method, and per image its grid and where its cells lie."""
        return {
            "question": self.question,
            "turns": [{"role": t.role, "content": t.content} for t in self.turns],
            "answer": self.answer,
            "generated": self.generated,
            "method": self.method,
            "logprob": self.logprob,
            "seconds": round(self.seconds, 4),
            "layout": self.layout,
            "maps": [
                {
                    "image": i,
                    "square": self.squares[i].size[0],
                    "grid": [int(n) for n in grid.shape],
                    "peak": list(self.peak(i)),
                    "peak_box": list(self.cell_box(i, *self.peak(i))),
                    "values": np.round(grid.astype(float), 6).tolist(),
                    **({"cls": self.cls[i]} if self.cls else {}),
                }
                for i, grid in enumerate(self.maps)
            ],
        }

    def overlay(self, image: int = 0, size: float = 3.0) -> Figure:
        """The image's square beside the map over it (red supports the answer, blue speaks against it),
        the question and the answer in the title."""
        return overlay(self.squares[image], self.maps[image], self.question, self.answer, self.method, size)

    def save(self, out_dir: str | Path, stem: str = "explain") -> list[Path]:
        """Write STEM.json, and per image STEM-I.png (the overlay) and STEM-I.npy (the grid)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / f"{stem}.json"]
        written[0].write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        for i, grid in enumerate(self.maps):
            np.save(out / f"{stem}-{i}.npy", grid)
            save_png(self.overlay(i), out / f"{stem}-{i}.png")
            written += [out / f"{stem}-{i}.png", out / f"{stem}-{i}.npy"]
        return written


def save_png(fig: Figure, target: str | Path | io.BytesIO) -> None:
    """Write a figure as PNG; characters the font lacks (an answer in another script) draw as boxes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(target, format="png", dpi=80)


def cell_box(side: int, grid: tuple[int, int], row: int, col: int) -> tuple[int, int, int, int]:
    """The pixels (x0, y0, x1, y1) of cell (row, col) of an h x w grid laid over a square of `side`."""
    h, w = grid
    return (col * side // w, row * side // h, (col + 1) * side // w, (row + 1) * side // h)


def overlay(
    square: Image.Image, grid: np.ndarray, question: str, answer: str, method: str, size: float = 3.0
) -> Figure:
    """A figure of `square` (left) and the map over it in grey (right: red supports the answer, blue
    speaks against it), the question and the answer in the title (matplotlib's object API)."""
    fig = Figure(figsize=(2 * size, size + 0.6))
    side = square.size[0]
    extent = (0, side, side, 0)
    left = fig.add_axes((0.01, 0.01, 0.48, size / (size + 0.6) - 0.02))
    right = fig.add_axes((0.51, 0.01, 0.48, size / (size + 0.6) - 0.02))
    left.imshow(np.asarray(square.convert("RGB")), extent=extent)
    right.imshow(np.asarray(square.convert("L")), cmap="gray", vmin=0, vmax=255, extent=extent)
    peak = float(np.abs(grid).max()) or 1.0
    right.imshow(grid, cmap="bwr", vmin=-peak, vmax=peak, alpha=0.6, extent=extent, interpolation="nearest")
    for ax in (left, right):
        ax.set_axis_off()
    title = f"Q: {question}\nA: {answer}   ({method})"
    # parse_math=False: "$" in a question or answer must not be read as matplotlib's maths markup
    fig.suptitle("\n".join(textwrap.shorten(line, 70) for line in title.splitlines()), fontsize=9,
                 y=0.995, va="top", parse_math=False)  # fmt: skip
    return fig


def token_layout(generator: Generator) -> str:
    """How the projector's image tokens lie on the tower's grid: `cells` (one token per cell),
    `blocks of FxF cells` (pixel shuffle), `pooled` (the resampler: every token mixes every cell), or
    `extension` (a projector the core does not know); relevance is on the cells whichever it is."""
    projector = generator.vlm.projector
    if isinstance(projector, (LinearProjector, MLP2xGelu)):
        return "cells"
    if isinstance(projector, PixelShuffle):
        return f"blocks of {projector.factor}x{projector.factor} cells"
    return "pooled" if isinstance(projector, Resampler) else "extension"


def conversation(
    prompts: Sequence[str], answers: Sequence[str], images: int
) -> tuple[list[Turn], str | None]:
    """Turns of prompts and answers taken in turn (the images go with the first prompt), and the answer
    to explain: the last of `answers` when there are as many as prompts, else None (the model answers)."""
    if not prompts or len(answers) not in (len(prompts), len(prompts) - 1):
        raise ValueError(
            f"{len(prompts)} prompt(s) and {len(answers)} answer(s): give one answer per prompt, or one "
            "fewer (the model then answers the last prompt)"
        )
    turns: list[Turn] = []
    for k, prompt in enumerate(prompts):
        held = images if k == 0 else 0
        turns.append(Turn("user", f"{IMAGE_PLACEHOLDER}\n" * held + prompt, held))
        if k < len(prompts) - 1:
            turns.append(Turn("assistant", answers[k]))
    return turns, (answers[-1] if len(answers) == len(prompts) else None)


class Explainer:
    """Relevance maps of answers over the images, for a vistune model (`load_generator`'s Generator).

    `batch_size` rows go through the model at once (occlusion, integrated gradients, deletion curves);
    `steps` are the integrated gradients' steps."""

    def __init__(self, generator: Generator, batch_size: int = 16, steps: int = 16):
        if generator.vlm is None:
            raise ValueError("a plain language model reads no images: there is nothing to map")
        if batch_size < 1 or steps < 1:
            raise ValueError(f"batch_size and steps must be at least 1, got {batch_size} and {steps}")
        self.generator, self.batch_size, self.steps = generator, batch_size, steps
        self.vlm, self.tower = generator.vlm, generator.vlm.vision
        self.layout = token_layout(generator)

    def explain(
        self,
        turns: list[Turn],
        images: Sequence[Image.Image],
        answer: str | None = None,
        method: str = "gradient",
        max_new_tokens: int = 32,
    ) -> Explanation:
        """Maps of `answer` (None: the model's own greedy answer) to the conversation `turns`, which ends
        with the user turn answered, about `images` (in the order of their placeholders)."""
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {list(METHODS)}")
        if not images:
            raise ValueError("the conversation holds no image: there is nothing to map")
        generated = answer is None
        if answer is None:
            answer = self.generator.generate([turns], [list(images)], max_new_tokens=max_new_tokens)[0]
        start = time.perf_counter()
        case = self.prepare(turns, images, answer)
        with torch.no_grad():
            logprob = float(self.logprobs(case, case.features[None])[0])
        maps, cls = {"gradient": self._gradient, "integrated": self._integrated,
                     "occlusion": self._occlusion}[method](case)  # fmt: skip
        return Explanation(
            turns, answer, generated, method, maps, case.squares, logprob, time.perf_counter() - start,
            self.layout, cls,
        )  # fmt: skip

    def prepare(self, turns: list[Turn], images: Sequence[Image.Image], answer: str) -> Case:
        """The token ids of conversation and answer, where the answer's tokens are, and the images'
        pixels, features and fill colours."""
        tokenizer = self.generator.tokenizer
        prompt = self.generator.prompt_ids(turns, len(images))
        target = tokenizer(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if not target:
            raise ValueError("the answer is empty: there is nothing to explain")
        context = context_length(self.generator.llm.config)
        if context is not None and len(prompt) + len(target) > context:
            raise ValueError(
                f"the conversation and answer are {len(prompt) + len(target)} tokens, over the model's "
                f"context ({context})"
            )
        device = self.generator.device
        ids = torch.tensor([prompt + target], device=device)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(target) - 1, device=device)
        pixels = self.tower.preprocess(list(images)).to(device)
        fill = pixels.flatten(2).median(dim=2).values[:, :, None, None]  # (n, 3, 1, 1) median colours
        with torch.no_grad():
            features = self.tower(pixels)
        squares = [
            to_square(im, self.tower.config.preprocess, self.tower.image_size, self.tower.mean)
            for im in images
        ]
        return Case(ids, positions, torch.tensor(target, device=device), pixels, fill, features, squares)

    def logprobs(self, case: Case, features: torch.Tensor) -> torch.Tensor:
        """(B,) log P(answer) for B variants of the images' features (B, n_images, N, D)."""
        rows, n_images = features.shape[:2]
        ids = case.ids.expand(rows, -1)
        embeds = self.vlm.embed(ids, vision_features=features.flatten(0, 1))
        hidden = self.vlm.llm.get_decoder()(inputs_embeds=embeds).last_hidden_state
        logits = self.vlm.llm.get_output_embeddings()(hidden[:, case.positions]).float()
        picked = logits.log_softmax(-1).gather(-1, case.target.expand(rows, -1)[..., None])
        return picked[..., 0].sum(-1)

    def _grid(self, per_token: torch.Tensor) -> tuple[list[np.ndarray], list[float]]:
        """(n_images, N) relevance per tower token -> per image an (h, w) grid, and the CLS shares."""
        h, w = self.tower.grid
        values = per_token.detach().float().cpu()
        maps = [v[-h * w :].reshape(h, w).numpy().astype(np.float32) for v in values]
        cls = [float(v[0]) for v in values] if values.shape[1] > h * w else []
        return maps, cls

    def _gradient(self, case: Case) -> tuple[list[np.ndarray], list[float]]:
        features = case.features.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.logprobs(case, features[None]).sum(), features)
        return self._grid((grad.float() * features.detach().float()).sum(-1))

    def _integrated(self, case: Case) -> tuple[list[np.ndarray], list[float]]:
        with torch.no_grad():
            base = self.tower(self.blank(case))
        delta = case.features - base
        alphas = (torch.arange(self.steps, dtype=delta.dtype, device=delta.device) + 0.5) / self.steps
        total = torch.zeros_like(delta, dtype=torch.float32)
        for chunk in alphas.split(self.batch_size):
            path = (base[None] + chunk[:, None, None, None] * delta[None]).detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self.logprobs(case, path).sum(), path)
            total += grad.float().sum(0)
        return self._grid((total / self.steps * delta.float()).sum(-1))

    def _occlusion(self, case: Case) -> tuple[list[np.ndarray], list[float]]:
        h, w = self.tower.grid
        with torch.no_grad():
            full = self.logprobs(case, case.features[None])[0]
            drops = []
            for image in range(len(case.squares)):
                cells = [[(r, c)] for r in range(h) for c in range(w)]
                drops.append(full - self.occluded_logprobs(case, image, cells))
        return self._grid(torch.stack(drops))

    def blank(self, case: Case) -> torch.Tensor:
        """The images' pixels with every pixel their fill colour."""
        return case.fill.expand_as(case.pixels).clone()

    def occluded_logprobs(
        self, case: Case, image: int, occlusions: Sequence[Sequence[tuple[int, int]]]
    ) -> torch.Tensor:
        """log P(answer) with, for each entry of `occlusions`, those (row, col) cells of one image filled
        with its fill colour (the other images as they are): (len(occlusions),)."""
        out = []
        side = self.tower.image_size
        for start in range(0, len(occlusions), self.batch_size):
            chunk = occlusions[start : start + self.batch_size]
            pixels = case.pixels[image][None].repeat(len(chunk), 1, 1, 1)
            for k, cells in enumerate(chunk):
                for row, col in cells:
                    x0, y0, x1, y1 = cell_box(side, self.tower.grid, row, col)
                    pixels[k, :, y0:y1, x0:x1] = case.fill[image]
            with torch.no_grad():
                features = case.features[None].repeat(len(chunk), 1, 1, 1)
                features[:, image] = self.tower(pixels)
                out.append(self.logprobs(case, features))
        return torch.cat(out)

    def deletion_curve(
        self, case: Case, grid: np.ndarray, image: int = 0, points: int = 8, order: np.ndarray | None = None
    ) -> np.ndarray:
        """P(answer) as an image's cells are filled in, most relevant first (or in `order`, flat cell
        indices): at 0, 1/points, ..., all of the cells; (points + 1,) probabilities."""
        h, w = grid.shape
        order = np.argsort(-grid.ravel(), kind="stable") if order is None else np.asarray(order)
        cuts = [round(k * h * w / points) for k in range(points + 1)]
        occlusions = [[(int(i) // w, int(i) % w) for i in order[:cut]] for cut in cuts]
        with torch.no_grad():
            return self.occluded_logprobs(case, image, occlusions).exp().cpu().numpy()


@dataclass
class Case:
    """One answer to explain, ready for the model (`Explainer.prepare`).

    Attributes:
        ids: (1, L) conversation and answer token ids.
        positions: the positions whose next token is an answer token.
        target: the answer's token ids.
        pixels: (n_images, 3, S, S) the tower's inputs.
        fill: (n_images, 3, 1, 1) each image's median colour, normalised: what occlusion paints.
        features: (n_images, N, D) the tower's features of the images.
        squares: the images as the tower sees them.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    target: torch.Tensor
    pixels: torch.Tensor
    fill: torch.Tensor
    features: torch.Tensor
    squares: list[Image.Image]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vistune explain", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("model", help="a vistune model dir")
    add("--image", action="append", default=[], required=True, help="an image of the first message")
    add("--prompt", action="append", default=[], required=True,
        help="a user message; repeat for a conversation (the images go with the first)")  # fmt: skip
    add("--answer", action="append", default=[],
        help="the answer to each prompt; as many as prompts: the last is explained, one fewer: the "
        "model answers the last prompt and its answer is explained")  # fmt: skip
    add("--method", action="append", choices=METHODS,
        help=f"one of {', '.join(METHODS)}; repeat for several (default: gradient)")  # fmt: skip
    add("--out", required=True, help="directory for METHOD.json and per image METHOD-I.png and METHOD-I.npy")
    add("--steps", type=int, default=16, help="integrated gradients' steps (default: 16)")
    add("--batch-size", type=int, default=16, help="rows through the model at once (default: 16)")
    add("--max-new-tokens", type=int, default=32, help="for the model's own answer (default: 32)")
    add("--device", help="cpu, cuda, ... (default: cuda when available)")
    return parser


def main_explain(argv: list[str] | None = None) -> int:
    """`vistune explain`: relevance maps of an answer over the images, written to --out."""
    from vistune.data.images import load_image
    from vistune.infer.generate import load_generator

    args = _parser().parse_args(argv)
    if not (Path(args.model) / MODEL_FILE).is_file():
        raise ValueError(
            f"{args.model}: not a vistune model dir (no {MODEL_FILE}); explain needs one that reads images"
        )
    images = [load_image(path) for path in args.image]
    turns, answer = conversation(args.prompt, args.answer, len(images))
    explainer = Explainer(
        load_generator(args.model, batch_size=1, device=args.device), args.batch_size, args.steps
    )
    generated = answer is None
    for method in args.method or ["gradient"]:
        found = explainer.explain(turns, images, answer, method, args.max_new_tokens)
        answer, found.generated = found.answer, generated  # the model answers once, for every method
        found.save(args.out, method)
        peaks = ", ".join(
            f"image {i}: cell {found.peak(i)} at pixels {found.cell_box(i, *found.peak(i))}"
            for i in range(len(found.maps))
        )
        print(
            f"{method}: answer {found.answer!r} (log p {found.logprob:.3f}); peak {peaks}; "
            f"{found.seconds:.2f} s"
        )
    print(f"wrote {args.out}")
    return 0
