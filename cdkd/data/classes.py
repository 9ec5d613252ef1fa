"""Land-cover class schemas: class ids, names and colours, and decoding of label masks into class ids.

A label mask comes either colour-coded (an RGB image, one colour per class, e.g. Dubai and DeepGlobe) or as an
index image (one raw value per pixel, e.g. LoveDA, ISPRS, OpenEarthMap). ``ClassSchema`` turns both into one
representation: an (H, W) int64 array of class ids ``0..K-1`` with ``ignore_index`` where a pixel has no usable
label (unlabeled, no-data, unknown). Every raw value or colour must be accounted for: a colour or value that the
schema does not know is an error, never a silent "ignore", because a wrong colour table would otherwise train a
model on nothing (or on the wrong classes) without any sign of it.

Class file format (YAML)::

    ignore_index: 255                              # optional, default 255: the id written for ignored pixels
    classes:                                       # ids must be 0..K-1 without gaps
      - {id: 0, name: building, color: "#3C1098"}  # colour as "#RRGGBB" ...
      - {id: 1, name: road, color: [110, 193, 228]}  # ... or as [R, G, B]
    ignore: [{value: 0}, {color: "#9B9B9B"}]       # optional: raw index values / colours that mean 'ignore'
    values: {1: 0, 2: 1}                           # optional: raw value -> class id map for index masks

Index masks: without ``values`` a raw value is the class id itself (``0..K-1``); with ``values`` only the listed
raw values are accepted (the map is complete: a raw value that it does not list is an error even if it happens
to be a valid id, so a partial map cannot silently mix two numberings). In both cases a raw value equal to
``ignore_index`` means 'ignore', and ``ignore`` values are added to the map as ``value -> ignore_index``.
Colour masks: a pixel whose colour is a class colour gets that class id, an ``ignore`` colour gets
``ignore_index``; any other colour is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import numpy as np
import yaml

from cdkd.errors import CdkdIOError, CdkdValueError, DataError

Color = tuple[int, int, int]

MAX_LISTED = 10  # unknown colours / values listed in an error message (most frequent first)

_HEX = re.compile(r"^#?([0-9a-fA-F]{6})$")


# --------------------------------------------------------------------------------------------------------------
# colours


def parse_color(value: Any, where: str = "colour") -> Color:
    """``"#RRGGBB"`` (``#`` optional) or a sequence of three integers 0..255 -> ``(r, g, b)`` ints."""
    if isinstance(value, str):
        m = _HEX.match(value.strip())
        if not m:
            raise CdkdValueError(f'{where}: {value!r} is not a colour: write it as "#RRGGBB" or [R, G, B]')
        h = m.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    try:
        parts = tuple(value)
    except TypeError:
        raise CdkdValueError(f'{where}: {value!r} is not a colour: write it as "#RRGGBB" or [R, G, B]') from None
    ok = len(parts) == 3 and all(
        not isinstance(p, bool) and isinstance(p, (int, np.integer)) and 0 <= p <= 255 for p in parts
    )
    if not ok:
        raise CdkdValueError(f'{where}: {value!r} is not a colour: need three integers 0..255 or "#RRGGBB"')
    return int(parts[0]), int(parts[1]), int(parts[2])


def color_hex(color: Sequence[int]) -> str:
    """``(60, 16, 152)`` -> ``"#3C1098"``."""
    return "#{:02X}{:02X}{:02X}".format(*(int(c) for c in color))


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(3, ...) integer colours 0..255 -> one int32 key per pixel, ``r << 16 | g << 8 | b``."""
    r, g, b = (rgb[k].astype(np.int32) for k in range(3))
    return (r << 16) | (g << 8) | b


def _key(color: Color) -> int:
    """The ``_pack`` key of one colour."""
    return (color[0] << 16) | (color[1] << 8) | color[2]


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


# --------------------------------------------------------------------------------------------------------------
# schema


@dataclass(frozen=True)
class LandCoverClass:
    """One class: its id (0-based, contiguous within a schema), a name for reports and a display colour."""

    id: int
    name: str
    color: Color

    def __post_init__(self) -> None:
        if not _is_int(self.id) or self.id < 0:
            raise CdkdValueError(f"class id {self.id!r} is not a non-negative integer")
        if not isinstance(self.name, str) or not self.name.strip():
            raise CdkdValueError(f"class {self.id}: name {self.name!r} is not a non-empty string")
        object.__setattr__(self, "id", int(self.id))
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "color", parse_color(self.color, f"class {self.id} ({self.name})"))


@dataclass(frozen=True)
class ClassSchema:
    """The classes of a labeled data set and how its masks encode them (see the module docstring).

    ``value_map`` maps raw index-mask values to class ids (or to ``ignore_index``); None means raw value = id.
    ``ignore_colors`` are the colours of colour-coded masks that mean 'ignore'. Classes are kept sorted by id.
    """

    classes: tuple[LandCoverClass, ...]
    ignore_index: int = 255
    ignore_colors: tuple[Color, ...] = ()
    value_map: dict[int, int] | None = field(default=None)

    def __post_init__(self) -> None:
        classes = tuple(sorted(self.classes, key=lambda c: c.id))
        if not classes:
            raise CdkdValueError("a class schema needs at least one class")
        ids = [c.id for c in classes]
        if ids != list(range(len(classes))):
            raise CdkdValueError(
                f"class ids must be 0..{len(classes) - 1} without gaps or repeats (one per class), got {ids}: "
                "renumber the classes from 0 (map raw mask values to ids with 'values')"
            )
        self._check_unique([c.name for c in classes], "class name")
        self._check_unique([color_hex(c.color) for c in classes], "class colour")
        if not _is_int(self.ignore_index):
            raise CdkdValueError(f"ignore_index {self.ignore_index!r} is not an integer")
        ignore_index = int(self.ignore_index)
        if 0 <= ignore_index < len(classes):
            raise CdkdValueError(
                f"ignore_index {ignore_index} is a class id (ids are 0..{len(classes) - 1}): use a value outside "
                "that range, e.g. 255"
            )
        ignore_colors = tuple(parse_color(c, "ignore colour") for c in self.ignore_colors)
        clash = sorted({color_hex(c) for c in ignore_colors} & {color_hex(c.color) for c in classes})
        if clash:
            raise CdkdValueError(f"colour(s) {', '.join(clash)} are both a class colour and an ignore colour")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "ignore_index", ignore_index)
        object.__setattr__(self, "ignore_colors", tuple(dict.fromkeys(ignore_colors)))  # dedupe, keep order
        object.__setattr__(self, "value_map", self._checked_value_map(len(classes), ignore_index))

    def __hash__(self) -> int:
        # the dataclass hash would fail on the value_map dict; equal schemas must hash alike (caches, sets)
        values = tuple(self.value_map.items()) if self.value_map is not None else None
        return hash((self.classes, self.ignore_index, self.ignore_colors, values))

    @staticmethod
    def _check_unique(items: list[str], what: str) -> None:
        seen: set[str] = set()
        for item in items:
            if item in seen:
                raise CdkdValueError(f"{what} {item!r} is used by more than one class: each class needs its own")
            seen.add(item)

    def _checked_value_map(self, k: int, ignore_index: int) -> dict[int, int] | None:
        if self.value_map is None:
            return None
        out: dict[int, int] = {}
        for raw, target in dict(self.value_map).items():
            raw_i = _as_int(raw, "raw mask value in 'values'")
            target_i = _as_int(target, f"class id for raw value {raw_i} in 'values'")
            if not (0 <= target_i < k or target_i == ignore_index):
                raise CdkdValueError(
                    f"'values' maps raw value {raw_i} to {target_i}, which is neither a class id (0..{k - 1}) nor "
                    f"ignore_index {ignore_index}"
                )
            out[raw_i] = target_i
        return dict(sorted(out.items()))

    # ---------------------------------------------------------------------------------------------------------
    # facts

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def colors(self) -> tuple[Color, ...]:
        return tuple(c.color for c in self.classes)

    def palette(self) -> np.ndarray:
        """(K, 3) uint8 class colours, indexable by class id (e.g. ``schema.palette()[ids]`` for a preview)."""
        return np.asarray(self.colors, dtype=np.uint8).reshape(-1, 3)

    # ---------------------------------------------------------------------------------------------------------
    # (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, strings, lists and int-keyed dicts (safe for YAML, JSON and ``torch.save(weights_only)``)."""
        d: dict[str, Any] = {
            "ignore_index": self.ignore_index,
            "classes": [{"id": c.id, "name": c.name, "color": color_hex(c.color)} for c in self.classes],
        }
        if self.ignore_colors:
            d["ignore"] = [{"color": color_hex(c)} for c in self.ignore_colors]
        if self.value_map is not None:
            d["values"] = dict(self.value_map)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "class schema") -> ClassSchema:
        """Inverse of ``to_dict``; also reads the class-file format of the module docstring.

        ``value_map`` keys may be strings of integers (JSON has no int keys). ``source`` prefixes error messages.
        """
        try:
            return cls._from_dict(d)
        except CdkdValueError as e:
            raise CdkdValueError(f"{source}: {e}") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any]) -> ClassSchema:
        if not isinstance(d, Mapping):
            raise CdkdValueError(f"expected a mapping with 'classes', got {type(d).__name__}")
        unknown = sorted(set(d) - {"ignore_index", "classes", "ignore", "values"})
        if unknown:
            raise CdkdValueError(f"unknown key(s) {unknown}: allowed are ignore_index, classes, ignore, values")
        raw_classes = d.get("classes")
        if not isinstance(raw_classes, Sequence) or isinstance(raw_classes, str) or not raw_classes:
            raise CdkdValueError("'classes' must be a non-empty list of {id, name, color} entries")
        classes = []
        for n, entry in enumerate(raw_classes):
            if not isinstance(entry, Mapping) or not {"id", "name", "color"} <= set(entry):
                raise CdkdValueError(f"class entry {n} ({entry!r}) needs id, name and color")
            classes.append(LandCoverClass(_as_int(entry["id"], f"class entry {n} id"), entry["name"], entry["color"]))
        ignore_index = _as_int(d.get("ignore_index", 255), "ignore_index")
        ignore_colors, ignore_values = _parse_ignore(d.get("ignore") or [])
        value_map = _build_value_map(d.get("values"), ignore_values, len(classes), ignore_index)
        return cls(tuple(classes), ignore_index, tuple(ignore_colors), value_map)

    @classmethod
    def load(cls, path: str | Path) -> ClassSchema:
        """Read a YAML class file (format in the module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise CdkdIOError(f"{path}: class file not found (a YAML file with 'classes: [{{id, name, color}}]')")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CdkdIOError(f"{path}: cannot read the class file as YAML ({e})") from e
        return cls.from_dict(data if data is not None else {}, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write the schema as a YAML class file (atomically)."""
        from cdkd.utils.atomic import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ---------------------------------------------------------------------------------------------------------
    # decoding

    def decode_rgb(self, mask: np.ndarray, path: str | Path = "mask") -> np.ndarray:
        """Colour-coded mask (3, H, W) (extra bands such as alpha are ignored) -> (H, W) int64 class ids.

        Raises:
            DataError: a colour is neither a class nor an ignore colour; the message lists the unknown colours
                with their pixel counts, and the known ones.
        """
        if mask.ndim != 3 or mask.shape[0] < 3:
            raise DataError(f"{path}: a colour-coded mask needs 3 bands (R, G, B), got shape {tuple(mask.shape)}")
        rgb = mask[:3]
        if rgb.dtype != np.uint8:
            if rgb.dtype.kind not in "ui" or (rgb.size and (rgb.min() < 0 or rgb.max() > 255)):
                raise DataError(
                    f"{path}: colour-coded mask of type {rgb.dtype} has values outside 0..255; "
                    "save colour masks as 8-bit RGB"
                )
        keys = _pack(rgb)
        known = [(_key(c), c_id) for c_id, c in enumerate(self.colors)]
        known += [(_key(c), self.ignore_index) for c in self.ignore_colors]
        known.sort()
        known_keys = np.asarray([k for k, _ in known], dtype=np.int32)
        known_ids = np.asarray([v for _, v in known], dtype=np.int64)
        # a handful of known colours: a binary search per pixel beats sorting the whole mask (np.unique)
        pos = np.minimum(np.searchsorted(known_keys, keys), len(known_keys) - 1)
        hit = known_keys[pos] == keys
        if not hit.all():
            values, counts = np.unique(keys[~hit], return_counts=True)
            listed = [(color_hex(((v >> 16) & 255, (v >> 8) & 255, v & 255)), n) for v, n in zip(values, counts)]
            raise DataError(
                f"{path}: {_unknown_list(listed, 'colour')}; known: {self._known_colors()}; "
                "add the missing colours to the class file (as classes or under 'ignore')"
            )
        return known_ids[pos]

    def decode_index(self, mask: np.ndarray, path: str | Path = "mask") -> np.ndarray:
        """Index mask (H, W) of raw values -> (H, W) int64 class ids (``value_map`` applied, see module docstring).

        Raises:
            DataError: a raw value the schema does not know; the message lists the values with pixel counts.
        """
        if mask.ndim != 2:
            raise DataError(f"{path}: an index mask needs one band, got shape {tuple(mask.shape)}")
        mask = _integral(mask, path)
        if mask.size == 0:
            return np.zeros(mask.shape, dtype=np.int64)
        lo, hi = int(mask.min()), int(mask.max())
        if lo >= 0 and hi < 65536:
            # small non-negative values (all 8- and 16-bit masks): count them and map through a table, no sort
            counts = np.bincount(mask.ravel().astype(np.intp, copy=False), minlength=hi + 1)
            present = np.flatnonzero(counts)
            mapped = [self._raw_to_id(int(v)) for v in present]
            bad = [(int(v), int(counts[v])) for v, m in zip(present, mapped) if m is None]
            if bad:
                self._raise_unknown_values(path, bad)
            lut = np.zeros(hi + 1, dtype=np.int64)
            lut[present] = cast("list[int]", mapped)  # no None left: unknown values raised above
            return lut[mask]
        values, inverse, counts = np.unique(mask, return_inverse=True, return_counts=True)
        mapped = [self._raw_to_id(int(v)) for v in values]
        bad = [(int(v), int(n)) for v, n, m in zip(values, counts, mapped) if m is None]
        if bad:
            self._raise_unknown_values(path, bad)
        return np.asarray(mapped, dtype=np.int64)[inverse.reshape(mask.shape)]

    def _raw_to_id(self, value: int) -> int | None:
        """Class id (or ignore_index) of one raw index-mask value, None if the schema does not know it."""
        if self.value_map is not None:
            if value in self.value_map:
                return self.value_map[value]
        elif 0 <= value < self.num_classes:
            return value
        return self.ignore_index if value == self.ignore_index else None

    def _raise_unknown_values(self, path: str | Path, bad: list[tuple[int, int]]) -> None:
        bad.sort(key=lambda vn: -vn[1])
        if self.value_map is not None:
            expected = "raw values " + ", ".join(f"{r}->{t}" for r, t in self.value_map.items())
        else:
            expected = f"class ids 0..{self.num_classes - 1}"
        raise DataError(
            f"{path}: {_unknown_list([(str(v), n) for v, n in bad], 'value')} outside the class schema "
            f"(expected {expected}, or {self.ignore_index} = ignore); give a class file whose 'values' / 'ignore' "
            "cover them, or check that this is the right format"
        )

    def _known_colors(self) -> str:
        parts = [f"{color_hex(c.color)} {c.name}" for c in self.classes]
        parts += [f"{color_hex(c)} ignore" for c in self.ignore_colors]
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# class-file helpers


def _as_int(value: Any, where: str) -> int:
    if _is_int(value):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise CdkdValueError(f"{where}: {value!r} is not an integer")


def _parse_ignore(entries: Any) -> tuple[list[Color], list[int]]:
    """``ignore: [{value: 0}, {color: "#9B9B9B"}]`` -> (colours, raw values)."""
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise CdkdValueError(f"'ignore' must be a list of {{value: N}} or {{color: ...}} entries, got {entries!r}")
    colors: list[Color] = []
    values: list[int] = []
    for entry in entries:
        if isinstance(entry, Mapping) and set(entry) == {"color"}:
            colors.append(parse_color(entry["color"], "ignore colour"))
        elif isinstance(entry, Mapping) and set(entry) == {"value"}:
            values.append(_as_int(entry["value"], "ignore value"))
        else:
            raise CdkdValueError(f"'ignore' entry {entry!r} must be {{value: N}} or {{color: \"#RRGGBB\"}}")
    return colors, values


def _build_value_map(values: Any, ignore_values: list[int], k: int, ignore_index: int) -> dict[int, int] | None:
    """Merge ``values`` and the ``ignore`` values into one raw value -> id map (None: raw value = id)."""
    if values is None and not ignore_values:
        return None
    if values is None:
        clash = sorted(v for v in ignore_values if 0 <= v < k)
        if clash:
            raise CdkdValueError(
                f"ignore value(s) {clash} are also class ids (0..{k - 1}); add a 'values' map that says what each "
                "raw mask value means"
            )
        out = {i: i for i in range(k)}  # no explicit map: raw values are ids
    else:
        if not isinstance(values, Mapping):
            raise CdkdValueError(f"'values' must be a mapping raw value -> class id, got {values!r}")
        out = {
            _as_int(r, "raw mask value in 'values'"): _as_int(t, f"class id for raw value {r!r}")
            for r, t in values.items()
        }
    for v in ignore_values:
        if out.get(v, ignore_index) != ignore_index:
            raise CdkdValueError(f"raw value {v} is listed under 'ignore' but 'values' maps it to class {out[v]}")
        out[v] = ignore_index
    return out


def _integral(mask: np.ndarray, path: str | Path) -> np.ndarray:
    """Integer view of an index mask; float masks are accepted only when every value is a whole number."""
    if mask.dtype.kind in "ui":
        return mask
    if mask.dtype.kind == "b":
        return mask.astype(np.uint8)
    if mask.dtype.kind == "f" and np.isfinite(mask).all() and (mask == np.round(mask)).all():
        return mask.astype(np.int64)
    raise DataError(f"{path}: index mask of type {mask.dtype} has non-integer values; save labels as integers")


def _unknown_list(items: list[tuple[str, int]], what: str) -> str:
    """'2 unknown colours: #FF0000 (120 px), #00FF00 (3 px)', most frequent first, at most MAX_LISTED."""
    items = sorted(items, key=lambda it: -it[1])
    shown = ", ".join(f"{name} ({n} px)" for name, n in items[:MAX_LISTED])
    more = f", and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} unknown {what}{'s' if len(items) != 1 else ''}: {shown}{more}"


# --------------------------------------------------------------------------------------------------------------
# built-in schemas


def _schema(
    names_colors: Sequence[tuple[str, str]],
    ignore_colors: Sequence[str] = (),
    value_map: dict[int, int] | None = None,
) -> ClassSchema:
    classes = tuple(LandCoverClass(i, n, parse_color(c)) for i, (n, c) in enumerate(names_colors))
    return ClassSchema(classes, 255, tuple(parse_color(c) for c in ignore_colors), value_map)


def _shifted(k: int) -> dict[int, int]:
    """Raw 0 = no-data (ignore), raw v = class v - 1 for v in 1..k (LoveDA, OpenEarthMap)."""
    return {0: 255, **{v: v - 1 for v in range(1, k + 1)}}


BUILTIN_SCHEMAS: dict[str, ClassSchema] = {
    # Dubai aerial imagery (MBRSC / Humans in the Loop): the true mask colours (its classes.json is wrong);
    # #9B9B9B marks unlabeled pixels and a few pixels are #000000
    "dubai": _schema(
        [
            ("building", "#3C1098"),
            ("land", "#8429F6"),
            ("road", "#6EC1E4"),
            ("vegetation", "#FEDD3A"),
            ("water", "#E2A929"),
        ],
        ignore_colors=["#9B9B9B", "#000000"],
    ),
    # DeepGlobe Land Cover: colour-coded masks, black = unknown
    "deepglobe": _schema(
        [
            ("urban", "#00FFFF"),
            ("agriculture", "#FFFF00"),
            ("rangeland", "#FF00FF"),
            ("forest", "#00FF00"),
            ("water", "#0000FF"),
            ("barren", "#FFFFFF"),
        ],
        ignore_colors=["#000000"],
    ),
    # LoveDA: index masks 0 = no-data, 1..7 -> ids 0..6; colours as in mmsegmentation's LoveDA palette
    "loveda": _schema(
        [
            ("background", "#FFFFFF"),
            ("building", "#FF0000"),
            ("road", "#FFFF00"),
            ("water", "#0000FF"),
            ("barren", "#9F81B7"),
            ("forest", "#00FF00"),
            ("agriculture", "#FFC380"),
        ],
        value_map=_shifted(7),
    ),
    # ISPRS Potsdam / Vaihingen (mmsegmentation conversion): index masks 0..5, 255 = ignore; colours are the
    # ISPRS label colours, so the original colour-coded label files decode too
    "isprs": _schema(
        [
            ("impervious_surface", "#FFFFFF"),
            ("building", "#0000FF"),
            ("low_vegetation", "#00FFFF"),
            ("tree", "#00FF00"),
            ("car", "#FFFF00"),
            ("clutter", "#FF0000"),
        ],
    ),
    # OpenEarthMap: index masks 0 = unknown, 1..8 -> ids 0..7; colours from the data set's own palette
    "openearthmap": _schema(
        [
            ("bareland", "#800000"),
            ("rangeland", "#00FF24"),
            ("developed_space", "#949494"),
            ("road", "#FFFFFF"),
            ("tree", "#226126"),
            ("water", "#0045FF"),
            ("agriculture", "#4BB549"),
            ("building", "#DE1F07"),
        ],
        value_map=_shifted(8),
    ),
}
