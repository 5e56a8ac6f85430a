"""The shapes world's projectors: an image read as the LLM's own words ("visual words", "object words").

Both take their settings from `projector.options` (`WordOptions`) and start their word vectors from the
LLM's input embeddings of those words; the `scene` objective's heads can initialise their classifiers
(`init_classifiers`). Registered by `vistune.shapes.plugin.register` as `visual_words` and
`object_words`, with `upgrade_saved` to read model dirs that an earlier version wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vistune.config import ProjectorConfig, build_dataclass
from vistune.model.projector import ProjectorContext


@dataclass
class WordOptions:
    """`projector.options` of the word projectors."""

    words: list[list[str]]  # word groups, e.g. [[small, large], [red, green, ...], [circle, square, ...]]
    shuffle_factor: int = 2  # visual_words: f x f neighbouring tokens are summed into one
    slots: int = 6  # object_words: most objects an image is read as
    position_bins: int = 10  # object_words: x and y are each read as one digit 0..bins-1 (at most 10)
    # object_words: one more token first, the number of objects found as a digit ("4: small red ...").
    # A small LLM miscounts a list of six; read once by the tower, the total is a word to copy.
    count: bool = False
    # object_words: each object's position digits before its words ("3 7 small red star"). The LLM reads
    # causally, so only a word after the digits can hold them: with the digits first, the shape word
    # that questions name the object by carries where the object is (docs/experiments.md).
    position_first: bool = False

    def __post_init__(self) -> None:
        if not self.words or not all(self.words):
            raise ValueError("words must be a non-empty list of non-empty word groups")
        if self.shuffle_factor < 1:
            raise ValueError(f"shuffle_factor must be at least 1, got {self.shuffle_factor}")
        if self.slots < 1:
            raise ValueError(f"slots must be at least 1, got {self.slots}")
        if not 2 <= self.position_bins <= 10:
            raise ValueError(f"position_bins must be 2..10 (one digit each), got {self.position_bins}")
        if self.count and self.slots > 9:
            raise ValueError(f"count is one digit: slots must be at most 9 with count, got {self.slots}")


def word_options(cfg: ProjectorConfig) -> WordOptions:
    """The projector's options as WordOptions; errors name the field under projector.options."""
    if "words" not in cfg.options:
        raise ValueError(f"projector {cfg.name}: options.words is required: a list of word groups")
    return build_dataclass(WordOptions, cfg.options, f"projector {cfg.name}: options")


def upgrade_saved(projector: dict[str, Any]) -> dict[str, Any]:
    """A word projector's config saved before its settings moved into `projector.options` (they were
    named fields beside `shuffle_factor`), in today's form."""
    moved = {k: projector.pop(k) for k in ("words", "slots", "position_bins") if k in projector}
    moved.setdefault("shuffle_factor", projector.get("shuffle_factor", 2))
    projector["options"] = moved | projector.get("options", {})
    return projector


def _word_vector(embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase, word: str) -> torch.Tensor:
    """The LLM's input embedding of `word` as it appears mid-sentence (mean over its tokens)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    # Tokenizers that split digits write " 7" as " " + "7": keep the tokens that carry the word.
    ids = [i for i in ids if tokenizer.decode([i]).strip()] or ids
    return embeddings[ids].mean(0)


@torch.no_grad()
def _copy_classifiers(
    groups, classifiers, heads: dict[str, nn.Linear], vocab: dict[str, tuple[str, ...]]
) -> None:
    """Copy into each group's classifier the head over the same words, reordered to the group's order."""
    for group, classifier in zip(groups, classifiers, strict=True):
        for name, words in vocab.items():
            if sorted(words) == sorted(group) and name in heads:
                order = [0] + [1 + words.index(w) for w in group]
                classifier.weight.copy_(heads[name].weight[order])
                classifier.bias.copy_(heads[name].bias[order])


class VisualWords(nn.Module):
    """Each image token becomes a mixture of the LLM's own word embeddings ("visual words").

    For every word group (say colours, shapes, sizes) a linear classifier over a patch token gives
    probabilities for "none" + the group's words; the token's embedding is the sum over groups of the
    probability-weighted word embeddings, which start as the LLM's input embeddings of those words and
    are trained with the rest. f x f neighbouring tokens are summed (f^2 fewer tokens). The LLM then reads
    image tokens much as it reads words; a `scene` stage's classifiers can initialise the groups'.
    """

    def __init__(self, cfg: ProjectorConfig, ctx: ProjectorContext):
        super().__init__()
        options, grid = word_options(cfg), ctx.grid
        f = options.shuffle_factor
        if grid is None or grid[0] % f or grid[1] % f:
            raise ValueError(f"projector visual_words: token grid {grid} is not divisible by factor {f}")
        self.groups = [list(g) for g in options.words]
        self.factor, self.grid = f, grid
        self.classifiers = nn.ModuleList(nn.Linear(ctx.in_dim, len(g) + 1) for g in self.groups)
        self.words = nn.ParameterList(
            nn.Parameter(torch.randn(len(g), ctx.out_dim) * 0.02) for g in self.groups
        )
        self.bind(ctx.word_embeddings, ctx.tokenizer)

    @torch.no_grad()
    def bind(self, embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> None:
        """Start each word's vector at the LLM's embedding of the word as it appears mid-sentence."""
        for group, vectors in zip(self.groups, self.words, strict=True):
            for k, word in enumerate(group):
                vectors[k] = _word_vector(embeddings, tokenizer, word).to(vectors.dtype)

    @torch.no_grad()
    def init_classifiers(self, heads: dict[str, nn.Linear], vocab: dict[str, tuple[str, ...]]) -> None:
        """Copy classifiers trained elsewhere (class 0 = none, then `vocab[name]` in order) into the
        groups with the same words."""
        _copy_classifiers(self.groups, self.classifiers, heads, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        (h, w), f = self.grid, self.factor
        out = 0
        for classifier, vectors in zip(self.classifiers, self.words, strict=True):
            probs = classifier(x[:, -h * w :]).softmax(-1)[..., 1:]  # (B, h*w, words): drop "none"
            out = out + probs @ vectors  # (B, h*w, Dl)
        out = out.view(b, h // f, f, w // f, f, -1).sum(dim=(2, 4))  # sum each f x f block
        return out.reshape(b, (h // f) * (w // f), -1)

    def num_tokens(self, n: int) -> int:
        return (self.grid[0] // self.factor) * (self.grid[1] // self.factor)


class ObjectWords(nn.Module):
    """Read an image as a short list of objects, each spelt with the LLM's own words and digits.

    Per grid cell, a linear classifier per word group (say sizes, colours, shapes) gives "none" + the
    group's words, and a regressor votes for where the nearest object centre is. Cells at least
    `MIN_SCORE` sure that an object is centred in them (1 - mean P(none)) are objects, except where a
    surer cell votes for nearly the same centre (the same object seen twice): the `slots` surest, ordered
    left to right (then top to bottom). Each becomes `len(groups) + 2` tokens: per group the
    probability-weighted word embeddings, then the x and y of its centre as digits 0..bins-1
    ("small red star 3 7"); unused slots read as "none". With `count`, a first token says how many
    objects were found, as a digit. Word and digit vectors start as the LLM's own
    embeddings, so the LLM reads the image much like a caption, and a `scene` stage's heads can
    initialise the classifiers and the regressor. The object choice and the digits are discrete; the
    word mixtures carry gradients to the classifiers.
    """

    MIN_SCORE = 0.5  # a cell must be this sure that some object is centred in it
    MERGE_DISTANCE = 1.0  # cells whose centre votes are closer (in cell sides) see the same object

    def __init__(self, cfg: ProjectorConfig, ctx: ProjectorContext):
        super().__init__()
        options, grid, in_dim, out_dim = word_options(cfg), ctx.grid, ctx.in_dim, ctx.out_dim
        if grid is None or grid[0] * grid[1] < options.slots:
            cells = (
                "no token grid"
                if grid is None
                else f"a {grid[0]}x{grid[1]} grid of {grid[0] * grid[1]} cells"
            )
            raise ValueError(
                f"projector object_words: {options.slots} slots need a tower grid of as many cells; "
                f"got {cells}"
            )
        self.groups = [list(g) for g in options.words]
        self.grid, self.slots, self.bins = grid, options.slots, options.position_bins
        self.count, self.position_first = options.count, options.position_first
        self.classifiers = nn.ModuleList(nn.Linear(in_dim, len(g) + 1) for g in self.groups)
        self.offset = nn.Linear(in_dim, 2)  # where the nearest object centre is, in cell sides
        self.words = nn.ParameterList(nn.Parameter(torch.randn(len(g), out_dim) * 0.02) for g in self.groups)
        self.digits = nn.Parameter(
            torch.randn(max(self.bins, self.slots + 1 if self.count else 0), out_dim) * 0.02
        )
        self.none = nn.Parameter(torch.randn(out_dim) * 0.02)
        self.bind(ctx.word_embeddings, ctx.tokenizer)

    @torch.no_grad()
    def bind(self, embeddings: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> None:
        """Start words, digits and "none" at the LLM's embeddings of them as they appear mid-sentence."""
        for group, vectors in zip(self.groups, self.words, strict=True):
            for k, word in enumerate(group):
                vectors[k] = _word_vector(embeddings, tokenizer, word).to(vectors.dtype)
        for k in range(len(self.digits)):
            self.digits[k] = _word_vector(embeddings, tokenizer, str(k)).to(self.digits.dtype)
        self.none.copy_(_word_vector(embeddings, tokenizer, "none").to(self.none.dtype))

    @torch.no_grad()
    def init_classifiers(self, heads: dict[str, nn.Linear], vocab: dict[str, tuple[str, ...]]) -> None:
        """Copy a scene stage's heads: per group the classifier with the same words (class 0 = none,
        then `vocab[name]` in order), and the "offset" regressor."""
        _copy_classifiers(self.groups, self.classifiers, heads, vocab)
        if "offset" in heads:
            self.offset.load_state_dict(heads["offset"].state_dict())

    def objects(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The objects read from features x (B, N, D), left to right then top to bottom, unused slots last:
        found (B, slots) bool, per group word probabilities (B, slots, words), position bins (B, slots, 2)."""
        h, w = self.grid
        x = x[:, -h * w :]
        probs = [classifier(x).softmax(-1) for classifier in self.classifiers]  # (B, h*w, 1 + words)
        score = 1 - torch.stack([p[..., 0] for p in probs]).mean(0).detach()  # (B, h*w) objectness
        cell = torch.arange(h * w, device=x.device)
        cell_xy = torch.stack([cell % w, cell // w], -1).to(x.dtype)  # (h*w, 2) column, row
        centre = cell_xy + self.offset(x).detach()  # (B, h*w, 2) the object centre each cell votes for
        # Two cells voting for (nearly) the same centre see one object: keep the surer one.
        close = torch.cdist(centre, centre) < self.MERGE_DISTANCE  # (B, h*w, h*w)
        stronger = (score[:, :, None] > score[:, None, :]) | (
            (score[:, :, None] == score[:, None, :]) & (cell[:, None] < cell[None, :])
        )
        candidate = score >= self.MIN_SCORE
        beaten = (close & stronger & candidate[:, :, None]).any(1)
        best, cells = score.masked_fill(beaten | ~candidate, -1.0).topk(self.slots, dim=1)  # (B, slots)
        xy = centre.gather(1, cells[..., None].expand(-1, -1, 2)) / torch.tensor(
            [w, h], dtype=x.dtype, device=x.device
        )
        order = torch.where(best > 0, xy[..., 0] + 1e-3 * xy[..., 1], 2.0).argsort(dim=1)
        cells, found, xy = (
            cells.gather(1, order),
            best.gather(1, order) > 0,
            xy.gather(1, order[..., None].expand_as(xy)),
        )
        words = []
        for p in probs:
            picked = p.gather(1, cells[..., None].expand(-1, -1, p.shape[-1]))[..., 1:]  # drop "none"
            words.append(picked / picked.sum(-1, keepdim=True).clamp_min(1e-6))
        return found, words, (xy * self.bins).long().clamp(0, self.bins - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        found, words, bins = self.objects(x)
        tokens = [p @ vectors for p, vectors in zip(words, self.words, strict=True)]
        digits = [self.digits[bins[..., 0]], self.digits[bins[..., 1]]]
        tokens = digits + tokens if self.position_first else tokens + digits
        out = torch.stack(tokens, 2)  # (B, slots, tokens per object, Dl)
        out = torch.where(found[..., None, None], out, self.none.to(out.dtype)).flatten(1, 2)
        if self.count:
            out = torch.cat([self.digits[found.sum(1)][:, None].to(out.dtype), out], 1)
        return out

    @torch.no_grad()
    def read(self, x: torch.Tensor) -> list[str]:
        """What the LLM is shown, as text (most likely word per group): 'small red star 3 7, ...' ('3 7 small
        red star, ...' with `position_first`), after "N: " with `count`."""
        found, words, bins = self.objects(x)
        best = torch.stack([p.argmax(-1) for p in words], -1).tolist()  # (B, slots, groups)
        bins, texts = bins.tolist(), []
        for i in range(x.shape[0]):
            objects = []
            for j in range(self.slots):
                if found[i, j]:
                    named = [g[k] for g, k in zip(self.groups, best[i][j], strict=True)]
                    digits = [str(v) for v in bins[i][j]]
                    objects.append(" ".join(digits + named if self.position_first else named + digits))
            texts.append((f"{len(objects)}: " if self.count else "") + ", ".join(objects))
        return texts

    def num_tokens(self, n: int) -> int:
        return self.slots * (len(self.groups) + 2) + self.count
