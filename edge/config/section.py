"""What every agent-file section and policy document model shares (pydantic; the
validating child only): the base model, custom error messages, paths relative to the
agent file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from edge.config.sources import MESSAGE_ONLY


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    value = value.expanduser()
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if base is None or value.is_absolute():
        return value
    return Path(base) / value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
"""A path; relative ones are resolved against the agent file's directory."""


def _error(message: str) -> PydanticCustomError:
    """A validation error reported with exactly ``message`` (no ``(got …)``)."""
    return PydanticCustomError(MESSAGE_ONLY, "{message}", {"message": message})


class _Section(BaseModel):
    """Base of every agent-file section: unknown keys are errors, defaults are checked,
    an absent or null sub-section means all of its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _default_sections(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, dict):
            return data
        missing: dict[str, object] = {
            name: {}
            for name, field in cls.model_fields.items()
            if isinstance(field.annotation, type)
            and issubclass(field.annotation, BaseModel)
            and data.get(name) is None
        }
        return {**data, **missing}
