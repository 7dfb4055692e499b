"""The base of every ``params.yaml`` section, and the error a bad one raises (shared by ``config`` and
``sampling``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pickstyle.errors import PickstyleError


class ParamsError(PickstyleError, ValueError):
    """``params.yaml`` (or an override) is invalid; the message names every offending key."""


class Section(BaseModel):
    """A ``params.yaml`` section: a typo'd key fails (``extra="forbid"``), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
