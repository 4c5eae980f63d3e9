"""Shared base for every spec model: strict, frozen, no unknown keys (ARCHITECTURE.md, principle 2)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

# Every seed reaches numpy / Lightning's seed_everything, which take 0 .. 2**32-1: a seed outside
# validated and then failed at the start of the run ("-7 is not in bounds").
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` passes `gt=0` but is never what a user meant.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, validate_default=True, allow_inf_nan=False
    )


def check(problems: list[tuple[str, str]]) -> None:
    """Raise one error carrying every cross-field problem found by a model validator.

    Each problem is (field path relative to the model, message). `moeplat.spec.diagnostics`
    expands them into separate issues pinned to that field's line, so a validator that finds
    three problems reports three lines, not one.
    """
    if problems:
        raise PydanticCustomError(
            "cross_field", "{summary}", {"summary": "; ".join(m for _, m in problems), "problems": problems}
        )
