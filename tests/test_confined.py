"""Nothing outside its own (issue 21): reads stay in --images-dir, writes stay in OUT and never
follow a link rayseg did not make, nothing runs from a loaded file, rayseg removes only its own.

Each test is a case that failed on the code before issue 21.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_coco import CATEGORIES, square, write_coco

from rayseg import checkpoint, models, storage
from rayseg.cli import main
from rayseg.errors import RaysegError


class Payload:
    """A pickle that, if unpickled with code allowed, creates the folder `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def payload_file(path: Path, ran: Path, **extra) -> Path:
    torch.save({"format": checkpoint.EXPORT_FORMAT, "state_dict": Payload(ran), **extra}, path)
    return path


# ---- no code runs from a loaded file -----------------------------------------------------------


@pytest.fixture
def no_weights_only_env(monkeypatch):
    """Some clusters set this; torch then unpickles anything where a call leaves it implicit."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def test_model_file_payload_is_refused_despite_the_env_override(tmp_path, no_weights_only_env):
    ran = tmp_path / "ran"
    evil = payload_file(tmp_path / "evil.pt", ran)
    with pytest.raises(RaysegError) as e:
        checkpoint.read_record(storage.locate(str(evil)))
    assert not ran.exists()
    message = str(e.value)
    assert message.startswith(f"{evil}: refused") and "\n" not in message
    assert "weights_only" not in message and "posix.mkdir" in message


def test_weights_payload_is_refused_despite_the_env_override(tmp_path, no_weights_only_env):
    ran = tmp_path / "ran"
    evil = payload_file(tmp_path / "evil.pt", ran)
    with pytest.raises(RaysegError, match="evil.pt: refused"):
        models._read_state_dict(str(evil))
    assert not ran.exists()


def test_predict_with_a_payload_checkpoint_is_one_line_exit_2(
    tmp_path, no_weights_only_env, capsys
):
    ran = tmp_path / "ran"
    evil = payload_file(tmp_path / "evil.pt", ran)
    argv = ["predict", "--checkpoint", str(evil), "--images", str(tmp_path), "--out", "o"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not ran.exists()
    assert err.count("\n") == 1 and "refused" in err and "weights_only" not in err


# ---- writes never follow a link rayseg did not make --------------------------------------------


@pytest.mark.parametrize("atomic", [True, False], ids=["renamed", "in-place"])
def test_a_link_at_an_output_name_is_replaced_never_written_through(tmp_path, atomic):
    victim = tmp_path / "victim.txt"
    victim.write_text("DATA")
    symlink, hardlink = tmp_path / "sym.png", tmp_path / "hard.png"
    symlink.symlink_to(victim)
    os.link(victim, hardlink)
    for name in (symlink, hardlink):
        storage.write_bytes(storage.locate(str(name)), b"PNG", atomic=atomic)
        assert not name.is_symlink() and name.read_bytes() == b"PNG"
    assert victim.read_text() == "DATA"
    assert [p.name for p in tmp_path.iterdir() if storage.is_temporary(p.name)] == []


def test_a_fifo_at_an_output_name_is_replaced_without_waiting(tmp_path):
    import signal

    def hung(signum, frame):
        raise TimeoutError("write_bytes waited on the FIFO")

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)  # before issue 21 the write waited forever for a reader
    try:
        storage.write_bytes(storage.locate(str(fifo)), b"PNG", atomic=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert fifo.is_file() and fifo.read_bytes() == b"PNG"


def test_a_linked_folder_below_out_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "masks").symlink_to(elsewhere, target_is_directory=True)
    loc = storage.locate(str(out))
    with pytest.raises(RaysegError, match="masks: is a symbolic link rayseg did not make"):
        storage.make_dirs(loc.join("masks"), below=loc)
    linked_out = tmp_path / "linked_out"
    linked_out.symlink_to(elsewhere, target_is_directory=True)  # the folder the user named
    storage.make_dirs(
        storage.locate(str(linked_out)).join("parquet"), below=storage.locate(str(linked_out))
    )
    assert (elsewhere / "parquet").is_dir()


def image_coco(names: list[str]) -> dict:
    """8x8 images named `names`, each with one 4x4 square of category 1."""
    return {
        "images": [
            {"id": k + 1, "file_name": n, "width": 8, "height": 8} for k, n in enumerate(names)
        ],
        "annotations": [
            {
                "id": 100 + k,
                "image_id": k + 1,
                "category_id": 1,
                "segmentation": [square(0, 0, 4, 4)],
                "area": 16.0,
                "iscrowd": 0,
            }
            for k in range(len(names))
        ],
        "categories": CATEGORIES,
    }


def jpeg(path: Path) -> bytes:
    import cv2

    data = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def masks_config(annotations: Path, out: Path, **kw):
    from rayseg.config import MasksConfig, load_config

    values = {"annotations": str(annotations), "out": str(out), "naming": "stem", **kw}
    return load_config(MasksConfig, None, values)


def test_masks_rerun_replaces_a_planted_link_and_leaves_its_target(ray_local, tmp_path):
    from rayseg.masks import run_masks

    annotations = write_coco(tmp_path / "a.json", image_coco(["x.jpg", "y.jpg"]))
    out = tmp_path / "o"
    run_masks(masks_config(annotations, out))
    victim = tmp_path / "precious.txt"
    victim.write_text("DATA")
    (out / "masks" / "x.png").unlink()
    (out / "masks" / "x.png").symlink_to(victim)  # checked by the rerun: shard 0 renders again
    run_masks(masks_config(annotations, out))
    assert victim.read_text() == "DATA"
    assert not (out / "masks" / "x.png").is_symlink()
    assert storage.decode_png((out / "masks" / "x.png").read_bytes()).sum() == 25  # 0..4 inclusive


# ---- reads stay inside --images-dir --------------------------------------------------------------


def test_names_outside_the_images_folder_are_listed_and_never_read(ray_local, tmp_path):
    from rayseg.masks import run_masks

    secret = tmp_path / "secret" / "secret.jpg"
    secret_bytes = jpeg(secret)
    images = tmp_path / "images"
    ok_bytes = jpeg(images / "ok.jpg")
    (images / "link.jpg").symlink_to(secret)  # a link inside that leaves the folder
    (images / "sub").mkdir()
    names = ["ok.jpg", "../secret/secret.jpg", str(secret), "link.jpg", "sub/../ok.jpg", "gone.jpg"]
    annotations = write_coco(tmp_path / "a.json", image_coco(names))

    manifest = run_masks(masks_config(annotations, tmp_path / "o", images_dir=str(images)))

    table = pq.read_table(tmp_path / "o" / "parquet").to_pylist()
    assert {r["file_name"]: r["image"] for r in table} == {
        "ok.jpg": ok_bytes,
        "sub/../ok.jpg": ok_bytes,
    }
    reasons = {p["image_id"]: p["reason"] for p in manifest["problems"]}
    for image_id in (2, 3, 4):
        assert reasons[image_id].endswith("is outside the images folder; not read")
    assert "missing" in reasons[6]  # inside the folder: what is wrong may be said

    followed = run_masks(
        masks_config(annotations, tmp_path / "o2", images_dir=str(images), follow_image_links=True)
    )
    table = pq.read_table(tmp_path / "o2" / "parquet").to_pylist()
    assert {r["file_name"]: r["image"] for r in table}["link.jpg"] == secret_bytes
    assert {p["image_id"] for p in followed["problems"]} == {2, 3, 6}


# ---- rayseg owns what it wrote, and only that ----------------------------------------------------


def test_masks_refuses_a_foreign_out_and_overwrite_keeps_what_it_did_not_write(ray_local, tmp_path):
    from rayseg.masks import run_masks

    annotations = write_coco(tmp_path / "a.json", image_coco(["x.jpg", "y.jpg"]))
    out = tmp_path / "o"
    out.mkdir()
    (out / "README.md").write_text("mine")
    with pytest.raises(RaysegError, match="not empty and no rayseg run made it .*README.md"):
        run_masks(masks_config(annotations, out))
    with pytest.raises(RaysegError, match="README.md was not written by rayseg"):
        run_masks(masks_config(annotations, out, overwrite=True))
    assert (out / "README.md").read_text() == "mine"

    (out / "README.md").rename(out / "notes.md")
    run_masks(masks_config(annotations, out, overwrite=True))  # writes beside notes.md
    (out / "masks" / "user.txt").write_text("mine too")
    run_masks(masks_config(annotations, out, naming="cats", overwrite=True))
    assert (out / "notes.md").read_text() == "mine" and (out / "masks" / "user.txt").exists()
    # The stem-named masks of the first run were recorded, so --overwrite removed them.
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "user.txt",
        "x_mask_cats_1.png",
        "y_mask_cats_1.png",
    ]


@pytest.mark.parametrize("where", ["images", "images/out", "images/../images/sub"])
def test_masks_out_in_or_around_the_images_folder_is_refused(tmp_path, where, capsys):
    images = tmp_path / "images"
    jpeg(images / "x.jpg")
    annotations = write_coco(tmp_path / "a.json", image_coco(["x.jpg"]))
    argv = ["masks", "--annotations", str(annotations), "--images-dir", str(images)]
    assert main([*argv, "--out", str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert "images folder" in err and err.count("\n") == 1
    assert sorted(p.name for p in images.iterdir()) == ["x.jpg"]


def test_subset_never_replaces_its_input_and_leaves_no_temporary(tmp_path, capsys):
    annotations = write_coco(tmp_path / "a.json", image_coco(["x.jpg", "y.jpg"]))
    before = annotations.read_bytes()
    argv = ["subset", "--annotations", str(annotations), "--num-images", "1"]
    assert main([*argv, "--out", str(annotations)]) == 2
    assert "is the input --annotations" in capsys.readouterr().err
    assert annotations.read_bytes() == before
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main([*argv, "--out", str(folder)]) == 2
    assert "--out is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "folder"]
    assert list(folder.iterdir()) == []


# ---- one naming rule; --max-pixels for predict and evaluate ------------------------------------


def test_predict_parquet_names_by_the_masks_rule_and_caps_pixels(ray_local, tmp_path):
    from mask_data import category_meta, encode_rgb, random_rgb, sample_row
    from tiny_models import save_tiny_model

    from rayseg import naming
    from rayseg.config import PredictConfig
    from rayseg.predict import run_predict

    model = save_tiny_model(str(tmp_path / "model.pt"))
    long = "n" * 300 + ".jpg"  # before: ENAMETOOLONG ended the whole run (exit 1)
    names = ["a/x.jpg", "b/x.jpg", long, ".hidden.jpg", "big.jpg"]
    sizes = [(20, 24), (20, 24), (20, 24), (20, 24), (60, 60)]
    rows = []
    for i, (name, (h, w)) in enumerate(zip(names, sizes, strict=True)):
        row = sample_row(
            i, None, np.zeros((h, w), np.uint8), image_bytes=encode_rgb(random_rgb(h, w, i))
        )
        rows.append({**row, "file_name": name})
    parquet = tmp_path / "data" / "parquet"
    parquet.mkdir(parents=True)
    meta = category_meta({1: "person", 3: "car"})
    storage.write_parquet(
        storage.locate(str(parquet / "part-00000.parquet")), storage.mask_table(rows, meta)
    )
    out = tmp_path / "out"

    summary = run_predict(
        PredictConfig(
            checkpoint=model, images=str(tmp_path / "data"), out=str(out), max_pixels=1000
        )
    )

    stems = naming.unique_stems(list(enumerate(names)))
    assert stems[:2] == ["x-0", "x-1"] and stems[3] == "_hidden"
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(
        f"{s}.png" for s in stems[:4]
    )
    assert summary["counts"]["inputs"] == 5
    assert (summary["counts"]["written"], summary["counts"]["skipped"]) == (4, 1)
    (skipped,) = summary["skipped"]
    assert (
        skipped["reason"] == "image is 60x60 = 3600 pixels, over --max-pixels 1000; not predicted"
    )


def test_evaluate_lists_images_over_max_pixels():
    from tiny_models import PERSON_CAR, tiny_model

    from rayseg.evaluate import score_images

    rows = [
        {"image_id": 1, "image": b"", "mask": b"", "height": 100, "width": 100},
    ]
    cm, scored, problems = score_images(tiny_model(3), rows, PERSON_CAR, max_pixels=5000)
    assert scored == 0 and cm.sum() == 0
    assert (
        problems[0].reason == "image is 100x100 = 10000 pixels, over --max-pixels 5000; not scored"
    )


# ---- one line and exit 2 -----------------------------------------------------------------------


def test_unmapped_mask_values_are_refused_with_the_rows_that_hold_them(tmp_path):
    from mask_data import category_meta, sample_row

    meta = category_meta({1: "person", 3: "car"})
    mask = np.zeros((4, 4), np.uint8)
    mask[0, :3] = 200  # no class of the masks' scheme has value 200
    rows = [sample_row(1, None, np.ones((4, 4), np.uint8)), sample_row(2, None, mask)]
    part = storage.locate(str(tmp_path / "part-00000.parquet"))
    storage.write_parquet(part, storage.mask_table(rows, meta))
    assert storage.unmapped_values([part], meta) == [(2, {200: 3})]
    with pytest.raises(
        RaysegError, match=r"1 rows hold mask values outside .*image 2: value 200 x 3 pixels"
    ):
        storage.check_mask_values([part], meta, "data")


def yaml_bomb(levels: int = 9) -> str:
    """The 'billion laughs' shape inside one config value: 9**levels strings when expanded."""
    lines = ['  a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels):
        lines.append(f"  a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]")
    return "classes:\n" + "\n".join(lines) + "\n"


def test_a_yaml_bomb_is_one_short_line(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(yaml_bomb() + "annotations: a.json\nout: o\n")
    assert main(["masks", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'classes' must be a string" in err and err.count("\n") == 1 and len(err) < 500


def test_json_nested_deep_is_one_line_exit_2(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text('{"images": [' + "[" * 100_000 + "]" * 100_000 + '], "annotations": []}')
    assert main(["subset", "--annotations", str(deep), "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and err.count("\n") == 1


def test_num_cpus_beyond_rays_limit_is_refused_before_ray(tmp_path, capsys):
    annotations = write_coco(tmp_path / "a.json", image_coco(["x.jpg"]))
    argv = ["masks", "--annotations", str(annotations), "--out", str(tmp_path / "o")]
    assert main([*argv, "--num-cpus", str(10**15)]) == 2
    err = capsys.readouterr().err
    assert "'num_cpus' is 1000000000000000, expected 1 <= num_cpus <= 100000000000000" in err


def test_the_masks_summary_counts_add_up():
    from rayseg.masks import summary_line

    counts = {
        "images_in": 24,
        "images_valid": 21,
        "masks_written": 9,
        "resumed": 0,
        "failed": 15,
        "problems": 15,
        "shards_run": 1,
        "shards": 1,
    }
    line = summary_line({"counts": counts}, "o")
    assert line.startswith("masks: 24 images -> 9 written, 0 resumed, 15 failed;")
    cut_short = summary_line({"counts": {**counts, "failed": 3}}, "o")
    assert "24 images -> 9 written, 0 resumed, 3 failed, 12 in unfinished shards;" in cut_short


# ---- the command line --------------------------------------------------------------------------


def test_a_mistyped_flag_names_its_command_and_the_nearest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["subset", "--num-image", "3", "--annotations", "a.json", "--out", "s.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        "rayseg subset: error: unrecognized argument --num-image; did you mean --num-images?" in err
    )


def test_version(capsys):
    from rayseg import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"rayseg {__version__}\n"


def test_predict_folder_lists_links_that_leave_it(tmp_path):
    from rayseg.predict import list_image_files

    secret = tmp_path / "secret.jpg"
    jpeg(secret)
    images = tmp_path / "images"
    jpeg(images / "ok.jpg")
    (images / "leak.jpg").symlink_to(secret)
    rows, problems = list_image_files(str(images))
    assert [r["name"] for r in rows] == ["ok"]
    assert [(p.name, p.reason) for p in problems] == [
        ("leak.jpg", "image file is outside the images folder; not read")
    ]
    rows, problems = list_image_files(str(images), follow_links=True)
    assert [r["name"] for r in rows] == ["leak", "ok"] and problems == []
