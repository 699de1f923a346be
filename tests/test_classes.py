"""rayseg.classes: the one parser of --classes, and the VOC subset of COCO (pure, no Ray)."""

import pytest

from rayseg.classes import VOC_CATEGORY_IDS, VOC_COCO_NAMES, chosen_category_ids, mask_classes
from rayseg.errors import RaysegError

NAMES = {1: "person", 3: "car", 7: "train", 18: "dog"}


def test_voc_ids_are_torchvisions_cat_list_in_voc_order():
    # references/segmentation/coco_utils.py: CAT_LIST = [0, 5, 2, 16, ...] (0: background).
    cat_list = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
    assert list(VOC_CATEGORY_IDS) == cat_list[1:]
    assert set(VOC_COCO_NAMES) == set(VOC_CATEGORY_IDS)
    assert VOC_COCO_NAMES[VOC_CATEGORY_IDS[15 - 1]] == "person"  # VOC class 15 is person


@pytest.mark.parametrize(
    "classes, expected",
    [
        ("all", [1, 3, 7, 18]),
        (" ALL ", [1, 3, 7, 18]),
        ("voc", list(VOC_CATEGORY_IDS)),
        ("Voc", list(VOC_CATEGORY_IDS)),
        ("7,1", [7, 1]),  # the order given is the pixel-value order
        ("3, 1,3,", [3, 1]),  # duplicates and an empty part dropped
        ("999", [999]),  # unknown ids are the caller's to judge
    ],
)
def test_chosen_category_ids(classes, expected):
    assert chosen_category_ids(classes, [18, 7, 3, 1]) == expected


@pytest.mark.parametrize(
    "classes, message",
    [
        ("cats", "classes: 'cats' is not 'all', 'voc' or comma-separated category ids"),
        ("1,two", "classes: '1,two' is not 'all', 'voc' or comma-separated category ids"),
        (" , ", "classes: ' , ' names no category ids"),
    ],
)
def test_a_bad_choice_is_one_clear_error(classes, message):
    with pytest.raises(RaysegError) as raised:
        chosen_category_ids(classes, [1])
    assert str(raised.value) == message


def test_mask_classes_keeps_the_files_names_in_the_chosen_order():
    assert mask_classes("7,1", NAMES) == {7: "train", 1: "person"}
    assert list(mask_classes("all", {7: "train", 1: "person"})) == [1, 7]


def test_mask_classes_voc_keeps_all_20_even_where_the_file_lacks_some():
    classes = mask_classes("voc", {1: "human", 3: "car", 90: "toothbrush"})
    assert list(classes) == list(VOC_CATEGORY_IDS)
    assert classes[1] == "human"  # the file's own name wins
    assert classes[5] == "airplane"  # COCO's, where the file has none
    assert 90 not in classes


def test_mask_classes_refuses_ids_the_file_does_not_list():
    with pytest.raises(RaysegError) as raised:
        mask_classes("1,5,99", NAMES)
    assert str(raised.value) == (
        "classes: category ids [5, 99] are not in the instances file's 'categories' "
        "(known: [1, 3, 7, 18])"
    )
