"""Error types shared across the package. This module imports nothing from the project, so any module (the data
group's config included) can raise them without an import cycle through `mova_train.config`."""

from __future__ import annotations


class ConfigValueError(ValueError):
    """A configuration value that cannot work; the message names the field and what is allowed."""
