import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

import rayseg
from rayseg import storage


def test_png_roundtrip_keeps_values_8_and_16_bit():
    rng = np.random.default_rng(0)
    for dtype, high in ((np.uint8, 256), (np.uint16, 65536)):
        mask = rng.integers(0, high, (37, 53)).astype(dtype)
        back = storage.decode_png(storage.encode_png(mask))
        assert back.dtype == dtype and np.array_equal(back, mask)


def test_palette_png_keeps_indices():
    mask = np.arange(200, dtype=np.uint8).reshape(10, 20) % 91
    data = storage.encode_png(mask, palette=storage.label_palette())
    assert data[25] == 3  # indexed colour
    assert np.array_equal(storage.decode_png(data), mask)


def test_atomic_write_leaves_no_temporaries(tmp_path):
    loc = storage.locate(str(tmp_path)).join("a.bin")
    storage.write_bytes(loc, b"123")
    storage.write_bytes(loc, b"45")
    assert storage.read_bytes(loc) == b"45"
    assert storage.list_files(storage.locate(str(tmp_path))) == ["a.bin"]


def test_stray_temporaries_removed_and_no_input_name_looks_like_one(tmp_path):
    (tmp_path / storage.temporary_name("x.png")).write_bytes(b"half")
    (tmp_path / "y.png").write_bytes(b"whole")
    # A mask of an image named keep.tmp-1.jpg (issue 9: it used to be deleted as a temporary).
    (tmp_path / "keep.tmp-1.png").write_bytes(b"whole")
    assert storage.remove_stray_temporaries(storage.locate(str(tmp_path))) == 1
    assert storage.list_files(storage.locate(str(tmp_path))) == ["keep.tmp-1.png", "y.png"]


def test_parquet_metadata_roundtrip(tmp_path):
    meta = {"values": "category_id", "ignore_value": 255, "classes": []}
    row = {
        "image_id": 1,
        "file_name": "a.jpg",
        "height": 2,
        "width": 2,
        "category_ids": [],
        "value_pixels": [{"value": 0, "pixels": 4}],
        "mask_path": "masks/a.png",
        "mask": storage.encode_png(np.zeros((2, 2), np.uint8)),
        "image": None,
    }
    (tmp_path / "parquet").mkdir()
    storage.write_parquet(
        storage.locate(str(tmp_path / "parquet" / "part-00000.parquet")),
        storage.mask_table([row], meta),
    )
    assert storage.read_mask_meta(str(tmp_path)) == {**meta, "rayseg_version": rayseg.__version__}
    assert pq.read_table(tmp_path / "parquet").num_rows == 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_label_pngs_decode_the_same_in_opencv_pillow_and_torchvision(dtype):
    import io

    import torch
    import torchvision.io
    from PIL import Image

    top = 255 if dtype == np.uint8 else 65535
    mask = np.random.default_rng(1).integers(0, top + 1, size=(37, 53)).astype(dtype)
    mask[0, :5] = [0, 1, 2, top - 1, top]
    data = storage.encode_png(mask)
    assert (cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) == mask).all()
    assert (np.asarray(Image.open(io.BytesIO(data))).astype(dtype) == mask).all()
    tensor = torchvision.io.decode_png(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), torchvision.io.ImageReadMode.UNCHANGED
    )
    assert (tensor[0].numpy().astype(dtype) == mask).all()


def test_encode_png_refuses_what_is_not_a_label_image():
    for bad in (np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6), np.int32), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="label PNG"):
            storage.encode_png(bad)
