"""The README's mmsegmentation config, as a user pastes it, against a `--layout voc` folder.

Without mmengine: the snippet has no import (mmengine parses any config with one lazily, where
`json.load` fails with a bare RuntimeError) and mmseg_metainfo.py is literals only. With mmengine,
mmsegmentation and mmcv-lite installed (not rayseg's dependencies: a throwaway environment, README
"mmsegmentation"): Config.fromfile with its defaults, then mmseg's own BaseSegDataset.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from rayseg import export, storage

README = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
CLASSES = [  # as rayseg.shard.scheme_meta writes them under --values train_id
    {"value": 1, "category_id": 1, "name": "person"},
    {"value": 2, "category_id": 3, "name": "car"},
]
META = {"background_value": 0, "ignore_value": 255, "classes": CLASSES}


def readme_snippet() -> str:
    """The Python block after "mmsegmentation (1.x) config snippet" in docs/outputs.md."""
    text = README.read_text()
    after = text[text.index("mmsegmentation (1.x) config snippet") :]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def voc_folder(out: Path) -> dict[str, np.ndarray]:
    """A --layout voc folder of 5 images (rayseg.export, as `rayseg masks` calls it)."""
    loc = storage.locate(str(out))
    export.prepare_voc(loc)
    masks, stems = {}, {}
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        stem = f"{i:012d}"
        mask = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(24, 32))
        image = rng.integers(0, 255, (24, 32, 3), np.uint8)
        jpeg = cv2.imencode(".jpg", image)[1].tobytes()
        export.write_voc_pair(loc, stem, jpeg, mask)
        masks[stem], stems[i] = mask, stem
    export.write_voc_lists(loc, stems, META, val_fraction=0.2, seed=0)
    return masks


def config_file(tmp_path: Path) -> Path:
    voc_folder(tmp_path / "OUT")
    path = tmp_path / "configs" / "voc_config.py"
    path.parent.mkdir()
    path.write_text(readme_snippet().replace('"OUT/', f'"{tmp_path}/OUT/'))
    return path


def test_readme_snippet_has_no_import_and_the_metainfo_file_is_literals(tmp_path):
    tree = ast.parse(readme_snippet().replace("{{_base_.", "(_base_.").replace("}}", ")"))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    voc_folder(tmp_path)
    text = (tmp_path / "VOCdevkit" / "VOC2012" / "mmseg_metainfo.py").read_text()
    values = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(text).body
        if isinstance(node, ast.Assign)
    }
    assert values["num_classes"] == 3
    assert values["metainfo"]["classes"] == ("background", "person", "car")
    assert values["metainfo"]["palette"] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


def test_mmengine_reads_the_readme_config_with_its_defaults(tmp_path):
    config = pytest.importorskip("mmengine.config")
    cfg = config.Config.fromfile(str(config_file(tmp_path)))  # lazy_import: mmengine's default
    dataset = cfg.train_dataloader.dataset
    assert dataset.metainfo["classes"] == ("background", "person", "car")
    assert cfg.val_dataloader.dataset.ann_file == "ImageSets/Segmentation/val.txt"


def stub_mmcv_ops() -> None:
    """mmcv-lite has no compiled mmcv.ops; mmseg imports only point_sample from it at import."""
    try:
        import mmcv.ops  # noqa: F401
    except (ImportError, ModuleNotFoundError):
        ops = types.ModuleType("mmcv.ops")

        def point_sample(*args, **kwargs):
            raise RuntimeError("mmcv.ops needs a compiled mmcv (mmcv-lite has none)")

        ops.point_sample = point_sample
        sys.modules["mmcv.ops"] = ops


def test_mmseg_dataset_gives_rayseg_masks(tmp_path):
    config = pytest.importorskip("mmengine.config")
    pytest.importorskip("mmcv")
    stub_mmcv_ops()
    pytest.importorskip("mmseg.datasets")  # registers mmseg's datasets and transforms
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")
    cfg = config.Config.fromfile(str(config_file(tmp_path)))
    masks = voc_folder(tmp_path / "OUT")  # the same files again: same seed
    load = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")]
    seen = {}
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        dataset = DATASETS.build({**loader.dataset, "pipeline": load})
        assert dataset.metainfo["classes"] == ("background", "person", "car")
        for i in range(len(dataset)):
            item = dataset[i]
            stem = Path(item["seg_map_path"]).stem
            seen[stem] = item["gt_seg_map"]
    assert sorted(seen) == sorted(masks)  # 4 train + 1 val, each once
    for stem, mask in masks.items():
        np.testing.assert_array_equal(seen[stem], mask)
