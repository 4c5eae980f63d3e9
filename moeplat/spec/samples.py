"""`train.samples`: text the model writes during training, logged into the run at every checkpoint
and at the end (samples/step_<N>.json, an MLflow table), so variants can be read side by side."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveInt, model_validator

from moeplat.spec.base import Seed, Strict, check


class SamplesSpec(Strict):
    """Prompts continued by the model being trained (moeplat.evaluate.generate, KV cache). The
    length limit (longest prompt in tokens + max_new_tokens <= model.max_seq_len) needs the
    tokenizer, so it is checked when the run starts."""

    prompts: Annotated[list[str], Field(min_length=1)] = Field(
        description="Prompts, each continued once per checkpoint (non-empty text)."
    )
    max_new_tokens: PositiveInt = Field(64, description="Tokens generated per prompt (at most).")
    temperature: Annotated[float, Field(ge=0)] = Field(0.0, description="0 = greedy.")
    top_k: PositiveInt | None = Field(None, description="Sample from the k most probable tokens only.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="Nucleus sampling (Holtzman et al. 2020): the smallest set with this mass."
    )
    seed: Seed = Field(0, description="Seed of the sampling (the same draws at every checkpoint).")

    @model_validator(mode="after")
    def _check(self) -> SamplesSpec:
        empty = [
            (f"prompts.{i}", "is empty: give some text to continue")
            for i, p in enumerate(self.prompts)
            if not p
        ]
        return check(empty) or self
