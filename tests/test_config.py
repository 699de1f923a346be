import pytest

from rayseg.config import MasksConfig, PipelineConfig, SubsetConfig, load_config
from rayseg.errors import RaysegError


def test_flags_override_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotations: a.json\nout: o\nnum_images: 5\nseed: 3\n")
    cfg = load_config(SubsetConfig, str(path), {"seed": 9, "num_images": None})
    assert (cfg.annotations, cfg.num_images, cfg.seed) == ("a.json", 5, 9)


def test_unknown_key_names_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotations: a.json\nout: o\nnum_imgs: 5\n")
    with pytest.raises(RaysegError, match="unknown key 'num_imgs'; did you mean 'num_images'"):
        load_config(SubsetConfig, str(path))


def test_wrong_type_names_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotations: a.json\nout: o\nshard_size: many\n")
    with pytest.raises(RaysegError, match="'shard_size' must be an integer"):
        load_config(MasksConfig, str(path))


def test_bad_choice_lists_valid(tmp_path):
    with pytest.raises(RaysegError, match="expected one of max, smallest_on_top"):
        load_config(MasksConfig, None, {"annotations": "a", "out": "o", "overlap": "min"})


def test_missing_required():
    with pytest.raises(RaysegError, match="missing required setting 'out'"):
        load_config(SubsetConfig, None, {"annotations": "a.json"})


def test_category_list_from_string():
    cfg = load_config(SubsetConfig, None, {"annotations": "a", "out": "o", "categories": "1,18"})
    assert cfg.categories == [1, 18]


def test_nested_sections_checked(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("out: run\nmasks:\n  overlapp: max\n")
    with pytest.raises(RaysegError, match="did you mean 'overlap'"):
        load_config(PipelineConfig, str(path))


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(RaysegError, match="invalid YAML at line"):
        load_config(SubsetConfig, str(path))
