"""rayseg.text: counts with the right noun."""

from rayseg.text import plural


def test_plural_is_singular_for_one_only():
    assert [plural(n, "worker") for n in (0, 1, 2)] == ["0 workers", "1 worker", "2 workers"]
    assert plural(1, "epoch") == "1 epoch" and plural(3, "epoch") == "3 epochs"
    assert plural(1, "class") == "1 class" and plural(81, "class") == "81 classes"
