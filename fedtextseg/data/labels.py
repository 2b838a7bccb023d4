"""Site label values -> binary channels of the universal vocabulary.

A site's label map says what each integer value means (``{1: liver, 2: liver tumor}``, ``{1: kidney}``). The model
sees one binary channel per vocabulary class. :func:`labels_to_channels` does the conversion:

* value ``v`` sets the channel of ``site.label_map[v]``;
* a value mapped to a **composite** ("kidney" = right kidney + left kidney) is split by **body side**;
* a tumor (or cyst) also sets its **organ's** channel (``vocab.parent_channels``: kidney tumor -> kidney), itself split
  by side when the organ is a composite (a tumor in the right kidney counts toward "right kidney"). This is set
  whether or not the organ is annotated at the site; :func:`annotated_mask` says which channels to trust;
* a value the label map does not declare is a :class:`SiteError` naming the file and the values;
* a value of a class outside the vocabulary that the site chose to ignore (``unmapped: ignore``) sets no channel and
  gets its own code, :attr:`LabelCoder.ignore_code`: :meth:`LabelCoder.known` is 0 there, and the losses and
  metrics leave those voxels out (they are neither a class's positive nor its negative).

**Body side.** World coordinates are RAS+ millimetres (the NIfTI convention nibabel's affines use): +x points to the
patient's RIGHT (DICOM's LPS+ is the opposite). The midline is taken as the world x of the centre of the image's
field of view (voxel ``(shape - 1) / 2``); voxels whose world x is above it are on the patient's right, the others
(including any voxel exactly on it) on the left. The result depends only on world coordinates, so an LAS- and an RAS-stored copy of the
same scan give the same channels. It assumes the patient lies roughly centred left-right in the scan, which holds
for clinical CT; a composite split this way is only as good as that assumption.

**Compact codes.** Splitting by side needs the original grid (the field-of-view centre moves when a volume is
cropped), but 32 uint8 channels per voxel are 32x the memory of one label map. So the conversion is done in two
steps: :func:`encode_labels` turns label values into one small integer *code* per voxel on the original grid (a code
stands for the set of channels that voxel belongs to, sides resolved), and :func:`decode_codes` expands codes into
channels. Codes survive nearest-neighbour resampling, cropping and padding exactly as channels would (nearest
picks one source voxel for every channel alike), so the transforms resample and cache codes and decode only the
patch. ``labels_to_channels = decode_codes(encode_labels(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtextseg.data.site import Site
from fedtextseg.errors import SiteError
from fedtextseg.vocab import Vocabulary

__all__ = [
    "LabelCoder",
    "labels_to_channels",
    "encode_labels",
    "decode_codes",
    "annotated_mask",
    "right_side_mask",
    "SIDES",
]

SIDES = ("right", "left")


def annotated_mask(site: Site) -> np.ndarray:
    """Boolean [C]: the vocabulary channels whose labels this site is authoritative for."""
    return site.annotated_mask()


def _channels_of(vocab: Vocabulary, cls: str, side: str | None) -> set[int]:
    """A class's channel plus its parents' (recursively), a composite parent resolved to the member on ``side``."""
    out = {vocab.index(cls)}
    parents = vocab.parent_channels(cls)
    sided = [p for p in parents if vocab.side_of(p) is not None]
    if len(parents) > 1 and side is not None and sided:
        parents = [p for p in parents if vocab.side_of(p) in (side, None)]
    for parent in parents:
        out |= _channels_of(vocab, parent, side)
    return out


def _needs_side(vocab: Vocabulary, cls: str) -> bool:
    """Whether a class's channel set depends on the body side (its parent chain passes through a lateral composite)."""
    parents = vocab.parent_channels(cls)
    if len(parents) > 1 and any(vocab.side_of(p) for p in parents):
        return True
    return any(_needs_side(vocab, p) for p in parents)


@dataclass(frozen=True)
class LabelCoder:
    """How a site's label values become per-voxel codes and codes become vocabulary channels.

    ``code_channels[k]`` = channels of code ``k`` (code 0 = background = no channel). ``value_codes[v]`` = the code of
    label value ``v``, or ``(right_code, left_code)`` when ``v`` is split by body side.
    """

    num_channels: int
    code_channels: tuple[tuple[int, ...], ...]
    value_codes: dict[int, tuple[int, ...]]
    annotated: tuple[bool, ...]
    ignore_code: int | None = None  # the code of every ignored label value (``unmapped: ignore``), if any

    @classmethod
    def for_site(cls, site: Site) -> "LabelCoder":
        vocab = site.vocabulary
        code_of: dict[tuple[int, ...], int] = {(): 0}
        value_codes: dict[int, tuple[int, ...]] = {}

        def code(channels: set[int]) -> int:
            key = tuple(sorted(channels))
            return code_of.setdefault(key, len(code_of))

        for value in sorted(site.label_map):
            name = site.label_map[value]
            members = vocab.expand(name)
            if len(members) > 1:
                by_side = {vocab.side_of(m): m for m in members}
                if set(by_side) != set(SIDES) or len(members) != 2:
                    raise SiteError(
                        site.root,
                        f"label value {value} is mapped to {name!r} = {members}, which cannot be split by body side; "
                        "map the value to one class",
                    )
                value_codes[value] = tuple(code(_channels_of(vocab, by_side[s], s)) for s in SIDES)
            elif _needs_side(vocab, members[0]):
                value_codes[value] = tuple(code(_channels_of(vocab, members[0], s)) for s in SIDES)
            else:
                value_codes[value] = (code(_channels_of(vocab, members[0], None)),)
        table = [()] * len(code_of)
        for channels, k in code_of.items():
            table[k] = channels
        ignore_code = None
        if site.ignored_values:  # one more code, setting no channel, for every ignored value
            ignore_code = len(table)
            table.append(())
            value_codes.update({int(v): (ignore_code,) for v in site.ignored_values})
        return cls(
            num_channels=vocab.num_classes,
            code_channels=tuple(table),
            value_codes=value_codes,
            annotated=tuple(bool(a) for a in site.annotated_mask()),
            ignore_code=ignore_code,
        )

    def known(self, codes):
        """uint8 mask of the voxels whose label is known (0 where the value is ignored); numpy or tensor in kind."""
        if isinstance(codes, torch.Tensor):
            plain = codes.as_subclass(torch.Tensor)
            return (plain != self.ignore_code).to(torch.uint8) if self.ignore_code is not None else \
                torch.ones_like(plain, dtype=torch.uint8)
        arr = np.asarray(codes)
        return (arr != self.ignore_code).astype(np.uint8) if self.ignore_code is not None else \
            np.ones(arr.shape, dtype=np.uint8)

    @property
    def num_codes(self) -> int:
        return len(self.code_channels)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.num_codes <= 256 else np.int16)

    def table(self) -> np.ndarray:
        """uint8 [C, K]: ``table[c, k] = 1`` when code ``k`` sets channel ``c``."""
        out = np.zeros((self.num_channels, self.num_codes), dtype=np.uint8)
        for k, channels in enumerate(self.code_channels):
            out[list(channels), k] = 1
        return out

    def positive_codes(self) -> np.ndarray:
        """bool [K]: codes that set at least one channel the site annotates (for positive crop sampling)."""
        annotated = np.asarray(self.annotated, dtype=bool)
        return np.array([bool(annotated[list(ch)].any()) if ch else False for ch in self.code_channels])

    def channel_counts(self, codes: np.ndarray) -> np.ndarray:
        """int64 [C]: voxels per channel of a code map, without decoding it."""
        per_code = np.bincount(np.asarray(codes).ravel().astype(np.int64), minlength=self.num_codes)
        return self.table().astype(np.int64) @ per_code[: self.num_codes]


def right_side_mask(coords: tuple[np.ndarray, ...], shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """For voxel indices ``coords`` (as from ``np.nonzero``), whether each lies on the patient's right.

    Right = world x (RAS+, +x = towards the patient's right) above the world x of the field-of-view centre
    ``(shape - 1) / 2``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ndim = len(shape)
    row = affine[0, :ndim]
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    x_rel = np.zeros(len(coords[0]), dtype=np.float64)
    for axis in range(ndim):
        if row[axis] != 0.0:
            x_rel += row[axis] * (coords[axis] - centre[axis])
    return x_rel > 0.0


def encode_labels(label: np.ndarray, affine: np.ndarray, site: Site, source: str | Path | None = None,
                  coder: LabelCoder | None = None) -> np.ndarray:
    """Per-voxel codes (``coder.dtype``, same shape as ``label``) on the label's own grid; see the module docstring."""
    coder = coder or LabelCoder.for_site(site)
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        if not np.array_equal(np.rint(label), label):
            raise SiteError(source or "<label array>", "label map has non-integer values")
        label = label.astype(np.int64)
    if label.ndim not in (2, 3):
        raise SiteError(source or "<label array>", f"label map must be 2D or 3D, got shape {label.shape}")
    values = np.unique(label)
    undeclared = [int(v) for v in values if v != 0 and int(v) not in coder.value_codes]
    if undeclared:
        shown = ", ".join(str(v) for v in undeclared[:10]) + (" ..." if len(undeclared) > 10 else "")
        names = {**site.label_map, **{v: f"{n} (ignored)" for v, n in site.ignored_values.items()}}
        declared = ", ".join(f"{v}={names[v]}" for v in sorted(names)[:20]) + (" ..." if len(names) > 20 else "")
        raise SiteError(
            source or "<label array>",
            f"label {'values' if len(undeclared) > 1 else 'value'} {shown} "
            f"{'are' if len(undeclared) > 1 else 'is'} not declared in the label map of site {site.name!r} "
            f"(declared: {declared})",
        )
    if values.size and values.min() < 0:
        raise SiteError(source or "<label array>", f"label map has negative values (min {int(values.min())})")
    lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=coder.dtype)
    split_values = []
    for v in values:
        v = int(v)
        if v == 0:
            continue
        codes = coder.value_codes[v]
        if len(codes) == 1:
            lut[v] = codes[0]
        else:
            split_values.append(v)
    out = lut[label]
    for v in split_values:
        coords = np.nonzero(label == v)
        right = right_side_mask(coords, label.shape, affine)
        right_code, left_code = coder.value_codes[v]
        values_at = np.where(right, right_code, left_code).astype(coder.dtype)
        out[coords] = values_at
    return out


def decode_codes(codes, coder: LabelCoder, has_channel: bool = False):
    """uint8 channels [C, *spatial] from codes [*spatial] (or [1, *spatial] with ``has_channel``).

    numpy in -> numpy out, tensor in -> plain tensor out (on the same device).
    """
    if has_channel:
        if codes.shape[0] != 1:
            raise ValueError(f"expected one channel of label codes, got shape {tuple(codes.shape)}")
        codes = codes[0]
    if isinstance(codes, torch.Tensor):
        idx = codes.as_subclass(torch.Tensor).long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= coder.num_codes):
            raise ValueError(f"label codes out of range [0, {coder.num_codes}); was this cache made for another site?")
        return torch.as_tensor(coder.table(), device=idx.device)[:, idx]
    arr = np.asarray(codes)
    if arr.size and (arr.min() < 0 or arr.max() >= coder.num_codes):
        raise ValueError(f"label codes out of range [0, {coder.num_codes}); was this cache made for another site?")
    return coder.table()[:, arr.astype(np.intp)]


def labels_to_channels(label: np.ndarray, affine: np.ndarray, site: Site,
                       source: str | Path | None = None) -> np.ndarray:
    """uint8 [C, *spatial]: one binary channel per vocabulary class (composites split by side, tumors in organs)."""
    coder = LabelCoder.for_site(site)
    return decode_codes(encode_labels(label, affine, site, source, coder), coder)
