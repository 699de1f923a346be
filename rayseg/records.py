"""What every stage shares: the reserved pixel values and the record of one bad input.

A `Problem` names where (image id or file name, optional annotation id) and why. Stages collect
them instead of raising; manifests and summaries list them with `Problem.to_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Pixel value 0 is the background in every mask scheme.
BACKGROUND = 0
# A mask's ignore value is its dtype's top value ("uint8" -> 255, "uint16" -> 65535).
DTYPE_MAX = {"uint8": 255, "uint16": 65535}
# Train ids (the model's classes 0..K-1) are uint8; 255 marks pixels the loss and metrics skip.
TRAIN_IGNORE = 255


@dataclass(frozen=True)
class Problem:
    """One bad input record: skipped or repaired, counted and listed, never silently dropped."""

    reason: str
    image_id: int | None = None
    annotation_id: int | None = None
    name: str | None = None  # an input file without an image id (predict on a folder)

    def to_dict(self) -> dict[str, Any]:
        """{"image_id" | "name", "annotation_id"?, "reason"}: the manifests' entry."""
        where: dict[str, Any] = (
            {"name": self.name} if self.name is not None else {"image_id": self.image_id}
        )
        if self.annotation_id is not None:
            where["annotation_id"] = self.annotation_id
        return {**where, "reason": self.reason}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> Problem:
        return cls(
            reason=entry["reason"],
            image_id=entry.get("image_id"),
            annotation_id=entry.get("annotation_id"),
            name=entry.get("name"),
        )
