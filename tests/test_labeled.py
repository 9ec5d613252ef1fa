"""Class schemas, labeled-pair discovery and decoding for every format, and labeled training tiles."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from conftest import make_geotiff, make_image, synthetic_image
from rasterio.errors import NotGeoreferencedWarning

from cdkd.data.classes import BUILTIN_SCHEMAS, ClassSchema, LandCoverClass, color_hex, parse_color
from cdkd.data.labeled import (
    FORMATS,
    LabeledPair,
    LabeledTiles,
    class_frequencies,
    find_pairs,
    mask_kind,
    read_label,
    read_pair,
    schema_for,
)
from cdkd.data.stats import NormStats
from cdkd.errors import CdkdIOError, CdkdValueError, DataError

IGNORE = 255
H, W = 40, 48  # fixture pair size (rows, columns)


# --------------------------------------------------------------------------------------------------------------
# helpers


def block_ids(k: int, seed: int, shape: tuple[int, int] = (H, W), with_ignore: bool = True) -> np.ndarray:
    """(H, W) int64 ids 0..k-1 in random 4x4 blocks, with some IGNORE blocks (asymmetric, for augmentation)."""
    rng = np.random.default_rng(seed)
    hi = k + 1 if with_ignore else k
    blocks = rng.integers(0, hi, size=(-(-shape[0] // 4), -(-shape[1] // 4)))
    ids = np.kron(blocks, np.ones((4, 4), dtype=np.int64))[: shape[0], : shape[1]]
    ids[ids == k] = IGNORE
    # every id (and ignore) appears at least once
    ids.flat[:hi] = [v if v < k else IGNORE for v in range(hi)]
    return ids


def encode_rgb(ids: np.ndarray, schema: ClassSchema) -> np.ndarray:
    """Ids -> (3, H, W) colour-coded mask; ignore pixels get the schema's first ignore colour."""
    table = {c.id: c.color for c in schema.classes}
    if schema.ignore_colors:
        table[IGNORE] = schema.ignore_colors[0]
    out = np.zeros((3,) + ids.shape, dtype=np.uint8)
    for v, color in table.items():
        out[:, ids == v] = np.asarray(color, dtype=np.uint8)[:, None]
    return out


def encode_index(ids: np.ndarray, shift: int, ignore_raw: int) -> np.ndarray:
    """Ids -> (1, H, W) uint8 index mask: raw = id + shift, ignore -> ``ignore_raw``."""
    raw = np.where(ids == IGNORE, ignore_raw, ids + shift)
    return raw.astype(np.uint8)[None]


def write_palette_png(path: Path, index: np.ndarray, colors: dict[int, tuple[int, int, int]]) -> Path:
    """(H, W) uint8 palette indexes with a colour table, as a paletted PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path,
            "w",
            driver="PNG",
            width=index.shape[1],
            height=index.shape[0],
            count=1,
            dtype="uint8",
            photometric="palette",
        ) as dst:
            dst.write(index, 1)
            dst.write_colormap(1, {i: c + (255,) for i, c in colors.items()})
    for aux in path.parent.glob(path.name + ".aux.xml"):
        aux.unlink()
    return path


def rgb_image(seed: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    return synthetic_image((3,) + shape, seed=seed)


def labels_of(pairs, schema) -> dict[str, np.ndarray]:
    return {p.name: read_pair(p, schema, [1, 2, 3])[1] for p in pairs}


RGB_STATS = NormStats(mean=(120.0, 120.0, 120.0), std=(50.0, 50.0, 50.0), bands=(1, 2, 3), dtype="uint8")


# --------------------------------------------------------------------------------------------------------------
# class schemas


def test_builtin_schemas_are_valid_and_round_trip(tmp_path):
    assert set(BUILTIN_SCHEMAS) == {"dubai", "deepglobe", "loveda", "isprs", "openearthmap"}
    assert [BUILTIN_SCHEMAS[k].num_classes for k in ("dubai", "deepglobe", "loveda", "isprs", "openearthmap")] == [
        5,
        6,
        7,
        6,
        8,
    ]
    dubai = BUILTIN_SCHEMAS["dubai"]
    assert dubai.names == ("building", "land", "road", "vegetation", "water")
    assert [color_hex(c) for c in dubai.colors] == ["#3C1098", "#8429F6", "#6EC1E4", "#FEDD3A", "#E2A929"]
    assert set(dubai.ignore_colors) == {(155, 155, 155), (0, 0, 0)}
    for name, schema in BUILTIN_SCHEMAS.items():
        d = schema.to_dict()
        # plain types only: YAML safe_dump and torch.save(weights_only=True) must accept them
        assert ClassSchema.from_dict(yaml.safe_load(yaml.safe_dump(d))) == schema
        torch.save(d, tmp_path / f"{name}.pt")
        assert ClassSchema.from_dict(torch.load(tmp_path / f"{name}.pt", weights_only=True)) == schema
        schema.save(tmp_path / f"{name}.yaml")
        loaded = ClassSchema.load(tmp_path / f"{name}.yaml")
        assert loaded == schema and hash(loaded) == hash(schema)


def test_class_file_format_from_the_docstring(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text(
        "ignore_index: 255\n"
        "classes:\n"
        "  - {id: 1, name: road, color: [110, 193, 228]}\n"  # order in the file does not matter
        '  - {id: 0, name: building, color: "#3C1098"}\n'
        'ignore: [{value: 0}, {color: "#9B9B9B"}]\n'
        "values: {1: 0, 2: 1}\n"
    )
    s = ClassSchema.load(path)
    assert s.names == ("building", "road") and s.colors == ((60, 16, 152), (110, 193, 228))
    assert s.value_map == {0: 255, 1: 0, 2: 1} and s.ignore_colors == ((155, 155, 155),)
    np.testing.assert_array_equal(s.decode_index(np.array([[0, 1, 2, 255]], dtype=np.uint8)), [[255, 0, 1, 255]])
    # JSON-style string keys are accepted
    assert ClassSchema.from_dict({**s.to_dict(), "values": {"0": 255, "1": 0, "2": 1}}) == s


@pytest.mark.parametrize(
    "ids, match",
    [((1, 2), r"0\.\.1 without gaps.*\[1, 2\]"), ((0, 2), r"\[0, 2\]"), ((0, 0), r"\[0, 0\]")],
)
def test_class_ids_must_start_at_0_and_be_contiguous(tmp_path, ids, match):
    path = tmp_path / "bad.yaml"
    classes = [{"id": i, "name": f"c{n}", "color": [n, 0, 0]} for n, i in enumerate(ids)]
    path.write_text(yaml.safe_dump({"classes": classes}))
    with pytest.raises(CdkdValueError, match=match) as e:
        ClassSchema.load(path)
    assert str(path) in str(e.value)


def test_class_schema_rejects_bad_values(tmp_path):
    c = (LandCoverClass(0, "a", (1, 2, 3)), LandCoverClass(1, "b", (4, 5, 6)))
    with pytest.raises(CdkdValueError, match="ignore_index 1 is a class id"):
        ClassSchema(c, ignore_index=1)
    with pytest.raises(CdkdValueError, match="#010203.*both a class colour and an ignore colour"):
        ClassSchema(c, ignore_colors=((1, 2, 3),))
    with pytest.raises(CdkdValueError, match="used by more than one class"):
        ClassSchema((LandCoverClass(0, "a", (1, 2, 3)), LandCoverClass(1, "b", (1, 2, 3))))
    with pytest.raises(CdkdValueError, match="raw value 3 to 7"):
        ClassSchema(c, value_map={3: 7})
    with pytest.raises(CdkdValueError, match="not a colour"):
        parse_color("#12345")
    with pytest.raises(CdkdValueError, match="not a colour"):
        parse_color([1, 2, 300])
    with pytest.raises(CdkdValueError, match=r"ignore value\(s\) \[1\] are also class ids"):
        ClassSchema.from_dict(
            {
                "classes": [{"id": 0, "name": "a", "color": "#000001"}, {"id": 1, "name": "b", "color": "#000002"}],
                "ignore": [{"value": 1}],
            }
        )
    with pytest.raises(CdkdIOError, match="class file not found"):
        ClassSchema.load(tmp_path / "missing.yaml")


def test_decode_rgb_unknown_colours_are_listed_with_pixel_counts():
    schema = BUILTIN_SCHEMAS["dubai"]
    ids = block_ids(5, seed=0)
    mask = encode_rgb(ids, schema)
    mask[:, :3, :40] = np.array([255, 0, 0], dtype=np.uint8)[:, None, None]  # 120 px
    mask[:, 10, :3] = np.array([0, 255, 0], dtype=np.uint8)[:, None]  # 3 px
    with pytest.raises(DataError) as e:
        schema.decode_rgb(mask, "tile1/masks/x.png")
    msg = str(e.value)
    assert msg.startswith("tile1/masks/x.png: 2 unknown colours: #FF0000 (120 px), #00FF00 (3 px); known: ")
    assert "#3C1098 building" in msg and "#9B9B9B ignore" in msg


def test_decode_index_values_outside_the_schema_are_listed_with_pixel_counts():
    schema = BUILTIN_SCHEMAS["isprs"]
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[0, :7] = 9
    mask[1, :2] = 12
    with pytest.raises(
        DataError,
        match=r"ann\.png: 2 unknown values: 9 \(7 px\), 12 \(2 px\) outside the class "
        r"schema \(expected class ids 0\.\.5",
    ):
        schema.decode_index(mask, "ann.png")
    loveda = BUILTIN_SCHEMAS["loveda"]
    with pytest.raises(DataError, match=r"1 unknown value: 8 \(1 px\).*raw values 0->255, 1->0"):
        loveda.decode_index(np.array([[0, 1, 8]], dtype=np.uint8), "m.png")
    # 16-bit and signed masks take the general path
    with pytest.raises(DataError, match=r"-3 \(1 px\)"):
        schema.decode_index(np.array([[0, -3]], dtype=np.int32), "m.tif")
    np.testing.assert_array_equal(schema.decode_index(np.array([[5, 255, 0]], dtype=np.uint16)), [[5, 255, 0]])


# --------------------------------------------------------------------------------------------------------------
# formats: generated fixtures in each layout


def test_dubai_layout_rgb_and_paletted_masks_split_and_missing_masks(tmp_path):
    schema = BUILTIN_SCHEMAS["dubai"]
    root = tmp_path / "dubai"
    expected = {}
    for t in (1, 2, 7):
        ids = block_ids(5, seed=t)
        make_image(root / f"tile{t}/images/image_part_001.jpg", rgb_image(t), "JPEG")
        if t == 2:
            # paletted mask, entries in a private order (as 18 of the real Dubai masks) plus an unused colour
            order = [1, 4, 0, IGNORE, 3, 2]
            colors = {n: (schema.ignore_colors[0] if v == IGNORE else schema.colors[v]) for n, v in enumerate(order)}
            colors[len(order)] = (255, 255, 255)
            index = np.zeros(ids.shape, dtype=np.uint8)
            for n, v in enumerate(order):
                index[ids == v] = n
            write_palette_png(root / f"tile{t}/masks/image_part_001.png", index, colors)
        else:
            make_image(root / f"tile{t}/masks/image_part_001.png", encode_rgb(ids, schema), "PNG")
        expected[f"tile{t}/images/image_part_001.jpg"] = ids
    # black is an ignore colour too
    black = encode_rgb(expected["tile7/images/image_part_001.jpg"], schema)
    black[:, :2, :] = 0
    make_image(root / "tile7/masks/image_part_001.png", black, "PNG")
    expected["tile7/images/image_part_001.jpg"][:2, :] = IGNORE
    make_image(root / "tile7/images/no_mask.jpg", rgb_image(9), "JPEG")

    with pytest.warns(
        UserWarning,
        match=r"skipped 1 of 4 images that have no mask \(first: "
        r"tile7/images/no_mask\.jpg, looked for tile7/masks/no_mask\.png\)",
    ):
        pairs = find_pairs(root, "dubai")
    assert [p.name for p in pairs] == sorted(expected)
    assert pairs[0].mask == str(root / "tile1/masks/image_part_001.png")
    for name, label in labels_of(pairs, schema).items():
        assert label.dtype == np.int64
        np.testing.assert_array_equal(label, expected[name])

    with pytest.warns(UserWarning):
        split = find_pairs(root, "dubai", split=["tile[1-6]"])
    assert [p.name for p in split] == ["tile1/images/image_part_001.jpg", "tile2/images/image_part_001.jpg"]
    assert mask_kind("dubai") == "rgb"


def test_deepglobe_layout(tmp_path):
    schema = BUILTIN_SCHEMAS["deepglobe"]
    root = tmp_path / "train"
    expected = {}
    for n in (119, 6399):
        ids = block_ids(6, seed=n)
        make_image(root / f"{n}_sat.jpg", rgb_image(n), "JPEG")
        make_image(root / f"{n}_mask.png", encode_rgb(ids, schema), "PNG")
        expected[f"{n}_sat.jpg"] = ids
    pairs = find_pairs(root, "deepglobe")
    assert [p.name for p in pairs] == ["119_sat.jpg", "6399_sat.jpg"]
    assert pairs[0].mask == str(root / "119_mask.png")
    for name, label in labels_of(pairs, schema).items():
        np.testing.assert_array_equal(label, expected[name])
    assert schema.ignore_colors == ((0, 0, 0),)


def test_loveda_mmseg_layout_with_split_folders(tmp_path):
    schema = BUILTIN_SCHEMAS["loveda"]
    root = tmp_path / "loveda"
    expected = {}
    for split, n in (("train", 0), ("train", 1), ("val", 2)):
        ids = block_ids(7, seed=n)
        make_image(root / f"img_dir/{split}/{n}.png", rgb_image(n), "PNG")
        make_image(root / f"ann_dir/{split}/{n}.png", encode_index(ids, shift=1, ignore_raw=0), "PNG")
        expected[f"img_dir/{split}/{n}.png"] = ids
    pairs = find_pairs(root, "loveda")
    assert [p.name for p in pairs] == sorted(expected)
    for name, label in labels_of(pairs, schema).items():
        np.testing.assert_array_equal(label, expected[name])  # raw 0 -> ignore, raw v -> v - 1
    assert [p.name for p in find_pairs(root, "loveda", split=["train"])] == [
        "img_dir/train/0.png",
        "img_dir/train/1.png",
    ]
    with pytest.raises(DataError, match=r"split \['test'\] matches none of the 3 loveda pairs"):
        find_pairs(root, "loveda", split=["test"])


def test_isprs_flat_mmseg_layout(tmp_path):
    schema = BUILTIN_SCHEMAS["isprs"]
    root = tmp_path / "potsdam"
    ids = block_ids(6, seed=3)
    make_image(root / "img_dir/2_10_0_0_512_512.png", rgb_image(3), "PNG")
    make_image(root / "ann_dir/2_10_0_0_512_512.png", encode_index(ids, shift=0, ignore_raw=255), "PNG")
    (pair,) = find_pairs(root, "isprs")
    assert pair == LabeledPair(
        str(root / "img_dir/2_10_0_0_512_512.png"),
        str(root / "ann_dir/2_10_0_0_512_512.png"),
        "img_dir/2_10_0_0_512_512.png",
    )
    image, label = read_pair(pair, schema, [1, 2, 3])
    assert image.shape == (3, H, W) and image.dtype == np.uint8
    np.testing.assert_array_equal(label, ids)
    # the original ISPRS colour-coded labels decode with the same schema
    rgb = encode_rgb(np.where(ids == IGNORE, 0, ids), schema)
    np.testing.assert_array_equal(schema.decode_rgb(rgb), np.where(ids == IGNORE, 0, ids))


def test_openearthmap_layout_geotiffs_and_nodata(tmp_path):
    schema = BUILTIN_SCHEMAS["openearthmap"]
    root = tmp_path / "oem"
    expected = {}
    for region in ("aachen", "zanzibar"):
        ids = block_ids(8, seed=len(region))
        image = rgb_image(len(region))
        if region == "zanzibar":
            image[:, :5, :5] = 0  # nodata: the label must say 'ignore' there
            ids = ids.copy()
            ids[:5, :5] = IGNORE
        make_geotiff(root / f"{region}/images/{region}_1.tif", image, nodata=0)
        make_geotiff(root / f"{region}/labels/{region}_1.tif", encode_index(block_ids(8, seed=len(region)), 1, 0))
        expected[f"{region}/images/{region}_1.tif"] = ids
    pairs = find_pairs(root, "openearthmap")
    assert [p.name for p in pairs] == sorted(expected)
    for name, label in labels_of(pairs, schema).items():
        np.testing.assert_array_equal(label, expected[name])
    # read_label looks at the mask alone: no nodata from the image
    assert (read_label(pairs[1], schema)[:5, :5] != IGNORE).any()


def test_folder_layout_needs_a_class_file(tmp_path):
    root = tmp_path / "data"
    ids = block_ids(3, seed=5)
    make_image(root / "images/a/scene.jpg", rgb_image(5), "JPEG")
    make_geotiff(root / "masks/a/scene.tif", encode_index(ids, shift=10, ignore_raw=0))
    with pytest.raises(CdkdValueError, match="format 'folder' has no built-in classes: give a class file"):
        schema_for("folder", None)
    classes = tmp_path / "classes.yaml"
    classes.write_text(
        yaml.safe_dump(
            {
                "classes": [{"id": i, "name": f"c{i}", "color": [i * 50, 0, 0]} for i in range(3)],
                "ignore": [{"value": 0}],
                "values": {10: 0, 11: 1, 12: 2},
            }
        )
    )
    schema = schema_for("folder", classes)
    (pair,) = find_pairs(root, "folder")
    assert pair.name == "images/a/scene.jpg"
    np.testing.assert_array_equal(read_pair(pair, schema, [1, 2, 3])[1], ids)
    assert mask_kind("folder") == "auto"
    # a class file overrides a built-in schema too
    assert schema_for("dubai", classes) == schema and schema_for("dubai", None) is BUILTIN_SCHEMAS["dubai"]


# --------------------------------------------------------------------------------------------------------------
# errors


def test_find_pairs_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        find_pairs(tmp_path / "missing", "dubai")
    with pytest.raises(CdkdValueError, match="unknown labeled-data format 'coco'.*" + ", ".join(FORMATS)):
        find_pairs(tmp_path, "coco")
    with pytest.raises(
        DataError,
        match=r"no isprs image/mask pair found: no image found; expected "
        r"<root>/img_dir/\[<split>/\]<name>\.png with masks <root>/ann_dir",
    ):
        find_pairs(tmp_path, "isprs")
    make_image(tmp_path / "tile1/images/a.jpg", rgb_image(0), "JPEG")
    with pytest.raises(
        DataError,
        match=r"1 image\(s\) without a mask, e\.g\. tile1/images/a\.jpg \(looked for "
        r"tile1/masks/a\.png\); expected <root>/<tile>/images",
    ):
        find_pairs(tmp_path, "dubai")


def test_image_mask_size_mismatch_names_both_files(tmp_path):
    make_image(tmp_path / "img_dir/a.png", rgb_image(0), "PNG")
    make_image(tmp_path / "ann_dir/a.png", np.zeros((1, H, W - 8), dtype=np.uint8), "PNG")
    (pair,) = find_pairs(tmp_path, "isprs")
    msg = rf"{pair.image} is {H}x{W} \(rows x columns\) but its mask {pair.mask} is {H}x{W - 8}"
    with pytest.raises(DataError, match=msg):
        read_pair(pair, BUILTIN_SCHEMAS["isprs"], [1, 2, 3])
    with pytest.raises(DataError, match=msg):
        LabeledTiles([pair], BUILTIN_SCHEMAS["isprs"], RGB_STATS, 32)


def test_unknown_colour_in_a_mask_file_names_the_file(tmp_path):
    schema = BUILTIN_SCHEMAS["deepglobe"]
    mask = encode_rgb(block_ids(6, seed=1), schema)
    mask[:, 0, :5] = np.array([1, 2, 3], dtype=np.uint8)[:, None]
    make_image(tmp_path / "1_sat.jpg", rgb_image(1), "JPEG")
    make_image(tmp_path / "1_mask.png", mask, "PNG")
    (pair,) = find_pairs(tmp_path, "deepglobe")
    with pytest.raises(DataError, match=rf"{pair.mask}: 1 unknown colour: #010203 \(5 px\)"):
        read_pair(pair, schema, [1, 2, 3])


def test_index_mask_values_outside_the_schema(tmp_path):
    make_image(tmp_path / "img_dir/a.png", rgb_image(0), "PNG")
    raw = encode_index(block_ids(6, seed=0), 0, 255)
    raw[0, :2, :3] = 6
    make_image(tmp_path / "ann_dir/a.png", raw, "PNG")
    (pair,) = find_pairs(tmp_path, "isprs")
    with pytest.raises(DataError, match=rf"{pair.mask}: 1 unknown value: 6 \(6 px\) outside the class schema"):
        read_pair(pair, BUILTIN_SCHEMAS["isprs"], [1, 2, 3])


# --------------------------------------------------------------------------------------------------------------
# training tiles


@pytest.fixture
def aligned_pair(tmp_path) -> LabeledPair:
    """A 40x48 PNG pair whose image encodes its own label: every band = 10 + 40 * id (ignore -> 250)."""
    ids = block_ids(6, seed=11, with_ignore=True)
    raw = np.where(ids == IGNORE, 250, 10 + 40 * ids).astype(np.uint8)
    make_image(tmp_path / "img_dir/a.png", np.stack([raw] * 3), "PNG")
    make_image(tmp_path / "ann_dir/a.png", encode_index(ids, 0, 255), "PNG")
    return find_pairs(tmp_path, "isprs")[0]


def label_from_image(image: torch.Tensor) -> np.ndarray:
    pixels = np.round(image[0].numpy() * RGB_STATS.std[0] + RGB_STATS.mean[0]).astype(np.int64)
    return np.where(pixels == 250, IGNORE, (pixels - 10) // 40)


def test_tiles_shapes_padding_and_determinism(aligned_pair):
    schema = BUILTIN_SCHEMAS["isprs"]
    ds = LabeledTiles([aligned_pair], schema, RGB_STATS, tile_size=64, augment=False)
    assert len(ds) == 1
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["label"].shape == (64, 64) and item["label"].dtype == torch.int64
    assert item["valid"].shape == (64, 64) and item["valid"].dtype == torch.bool
    # the 40x48 pair sits top-left; the padding is ignored, invalid and 0 in normalised space
    assert item["valid"][:H, :W].all() and not item["valid"][H:].any() and not item["valid"][:, W:].any()
    assert (item["label"][H:] == IGNORE).all() and (item["label"][:, W:] == IGNORE).all()
    assert (item["image"][:, H:] == 0).all() and (item["image"][:, :, W:] == 0).all()
    np.testing.assert_array_equal(item["label"][:H, :W].numpy(), read_pair(aligned_pair, schema, [1])[1])

    with pytest.raises(CdkdValueError, match="not a multiple of the patch size"):
        LabeledTiles([aligned_pair], schema, RGB_STATS, tile_size=40)
    with pytest.raises(DataError, match="no labeled image/mask pair"):
        LabeledTiles([], schema, RGB_STATS, tile_size=32)


def test_tiles_are_a_pure_function_of_seed_and_sample_number(tmp_path):
    schema = BUILTIN_SCHEMAS["isprs"]
    for n in range(3):
        make_image(tmp_path / f"img_dir/{n}.png", rgb_image(n, (70, 90)), "PNG")
        make_image(tmp_path / f"ann_dir/{n}.png", encode_index(block_ids(6, n, (70, 90)), 0, 255), "PNG")
    pairs = find_pairs(tmp_path, "isprs")

    def items(seed: int, order):
        ds = LabeledTiles(pairs, schema, RGB_STATS, tile_size=32, seed=seed)
        return {i: ds[i] for i in order}

    forward, backward = items(0, range(9)), items(0, reversed(range(9)))
    for i in range(9):
        for key in ("image", "label", "valid"):
            assert torch.equal(forward[i][key], backward[i][key])
    other = items(1, range(9))
    assert any(not torch.equal(forward[i]["image"], other[i]["image"]) for i in range(9))
    # each epoch (3 samples) visits every pair once
    ds = LabeledTiles(pairs, schema, RGB_STATS, tile_size=32)
    for epoch in range(3):
        assert sorted(ds.pair_index(i) for i in range(3 * epoch, 3 * epoch + 3)) == [0, 1, 2]
    with pytest.raises(CdkdValueError, match="non-negative integer"):
        ds[-1]


def test_augmentation_keeps_image_and_label_aligned(aligned_pair):
    schema = BUILTIN_SCHEMAS["isprs"]
    plain = LabeledTiles([aligned_pair], schema, RGB_STATS, tile_size=32, augment=False, seed=3)
    aug = LabeledTiles([aligned_pair], schema, RGB_STATS, tile_size=32, augment=True, seed=3)
    transformed = 0
    for i in range(16):
        item, ref = aug[i], plain[i]
        # the label that the augmented image encodes is the augmented label, pixel for pixel
        np.testing.assert_array_equal(label_from_image(item["image"]), item["label"].numpy())
        # the same window, under one of the 8 flips/rotations
        base = ref["label"].numpy()
        variants = [np.rot90(v, k) for v in (base, base[:, ::-1]) for k in range(4)]
        match = [np.array_equal(v, item["label"].numpy()) for v in variants]
        assert any(match)
        transformed += not match[0]
    assert transformed > 0


# --------------------------------------------------------------------------------------------------------------
# real data (skipped when ../shared/data is absent)


def test_real_dubai_all_masks_decode_with_the_true_colours(shared_data):
    root = shared_data / "labeled" / "dubai"
    schema = schema_for("dubai", None)
    pairs = find_pairs(root, "dubai")
    assert len(pairs) == 72
    split = find_pairs(root, "dubai", split=["tile[1-6]"])
    assert len(split) == 54 and {p.name.split("/")[0] for p in split} == {f"tile{t}" for t in range(1, 7)}
    ignored = 0
    for pair in pairs:  # every mask: an unknown colour would raise
        label = read_label(pair, schema)
        ignored += int((label == IGNORE).sum())
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4, IGNORE}
    assert ignored > 0
    ds = LabeledTiles(pairs, schema, RGB_STATS, tile_size=256)  # checks every pair's sizes
    item = ds[0]
    assert item["image"].shape == (3, 256, 256) and set(item["label"].unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE}


def test_real_loveda_isprs(shared_data):
    loveda = find_pairs(shared_data / "labeled" / "loveda", "loveda")
    assert len(loveda) == 3
    schema = schema_for("loveda", None)
    labeled = 0
    for pair in loveda:
        with rasterio.open(pair.mask) as src:
            raw = src.read(1).astype(np.int64)
        label = read_label(pair, schema)
        np.testing.assert_array_equal(label, np.where(raw == 0, IGNORE, raw - 1))
        assert set(np.unique(label).tolist()) <= set(range(7)) | {IGNORE}
        labeled += int((raw != 0).sum())
    freq = class_frequencies(loveda, schema)
    assert freq.shape == (7,) and freq.sum() == labeled
    for name in ("potsdam", "vaihingen"):
        (pair,) = find_pairs(shared_data / "labeled" / name, "isprs")
        image, label = read_pair(pair, schema_for("isprs", None), [1, 2, 3])
        assert image.shape == (3, 512, 512) and set(np.unique(label).tolist()) == set(range(6))
