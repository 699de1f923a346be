"""Ray Data helpers shared by evaluate and predict: an actor pool, rows with a Progress.

Ray is imported inside the functions that use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rayseg.progress import Progress
from rayseg.rayoutput import quiet_ray_data


def map_with_actors(
    ds: Any,
    actor: type,
    *,
    constructor_kwargs: dict[str, Any],
    batch_size: int,
    num_actors: int,
    use_gpu: bool,
) -> Any:
    """ds.map_batches through a fixed pool of `num_actors` `actor`s (a GPU each with use_gpu).

    `ds` is a ray.data.Dataset; each actor is built once (a model loaded once per replica).
    """
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
    )


def rows_with_progress(ds: Any, *, total: int, label: str) -> Iterator[dict[str, Any]]:
    """ds.iter_rows() with a Progress of rows done (Ray Data's own bars only with --verbose)."""
    quiet_ray_data()
    progress = Progress(total, label)
    try:
        for row in ds.iter_rows():
            progress.update(1)
            yield row
    finally:
        progress.close()
