"""The pictures rayseg writes, read back as a person would: legible at 81 classes, titles whole,
whole-epoch ticks (matplotlib figures inspected after drawing; no Ray)."""

import numpy as np

from rayseg.checkpoint import curves_figure
from rayseg.evaluate import MIN_FONT_PT, confusion_figure, confusion_png, plot_title

MODEL = "deeplabv3_mobilenet_v3_large"


def confusion(k: int, present: int) -> tuple[np.ndarray, list[str]]:
    """A (k, k) matrix whose first `present` classes have pixels, mostly right."""
    names = ["background", *(f"category number {i}" for i in range(1, k))]
    cm = np.zeros((k, k), np.int64)
    for i in range(present):
        cm[i, i] = 1000 + i
        cm[i, (i + 1) % present] = 50
    return cm, names


def drawn_texts(fig) -> list:
    """The titles, axis labels and the tick labels within each axis' view (matplotlib keeps
    labels of ticks outside the view as artists, but does not draw them)."""
    texts = [t for t in fig.texts if t.get_text()]
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lo, hi), max(lo, hi)
            for tick in axis.get_major_ticks():
                if lo <= tick.get_loc() <= hi:
                    texts.append(tick.label1)
    return [t for t in texts if t.get_text() and t.get_visible()]


def texts_inside(fig) -> list[str]:
    """Every drawn text that the figure's edge cuts (empty when none is)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    cut = []
    for text in drawn_texts(fig):
        box = text.get_window_extent(renderer)
        if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5:
            cut.append(text.get_text())
    return cut


def test_confusion_matrix_title_is_never_cut():
    for k in (6, 21):  # 81: in the test below
        cm, names = confusion(k, k)
        title = plot_title({"miou": 0.873, "pixel_accuracy": 0.97}, MODEL)
        fig = confusion_figure(cm, names, title=title)
        # Before: at 6 classes "...pixel accuracy 0.97" ran off both edges.
        assert texts_inside(fig) == [], k
        assert "pixel accuracy 0.970" in fig._suptitle.get_text()


def test_confusion_matrix_at_81_classes_shows_the_present_ones_legibly():
    cm, names = confusion(81, 40)
    fig = confusion_figure(cm, names, title="m: mIoU 0.5, pixel accuracy 0.9")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == names[:40]  # before: all 81, of which 41 were empty rows and columns
    sizes = {t.get_fontsize() for t in ax.get_xticklabels() + ax.get_yticklabels()}
    assert min(sizes) >= MIN_FONT_PT  # before: 5 pt, about 6 px tall
    assert "the 40 of 81 classes" in fig._suptitle.get_text()
    assert texts_inside(fig) == []
    # One cell is at least as tall as a label at 100 dpi: rows of labels do not overlap.
    fig.canvas.draw()
    cell_px = ax.get_window_extent().height / 40
    assert cell_px >= MIN_FONT_PT / 72 * fig.dpi
    assert confusion_png(cm[:6, :6], names[:6])[:4] == b"\x89PNG"


def test_confusion_matrix_of_few_classes_keeps_them_all():
    cm, names = confusion(6, 6)
    fig = confusion_figure(cm, names)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == names
    assert fig._suptitle is None


def test_curves_have_whole_epoch_ticks():
    for epochs in (1, 3, 30):
        history = [{"epoch": e, "loss": 1 / e, "val_miou": 0.01 * e} for e in range(1, epochs + 1)]
        fig = curves_figure(history)
        fig.canvas.draw()
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), (epochs, ticks)
        assert texts_inside(fig) == []
