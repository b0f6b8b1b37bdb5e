"""Where ragmix keeps what it builds: the default model bundles and the default index.

`RAGMIX_CACHE_DIR` (or `--cache-dir`) overrides the user's cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ENV_CACHE_DIR = "RAGMIX_CACHE_DIR"

DEFAULT_GENERATOR = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"
DEFAULT_INDEX = "python-reference"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    if env := os.environ.get(ENV_CACHE_DIR):
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("ragmix"))


def default_generator_dir(cache: Path) -> Path:
    return cache / "models" / DEFAULT_GENERATOR


def default_encoder_dir(cache: Path) -> Path:
    return cache / "models" / DEFAULT_ENCODER


def default_index_dir(cache: Path) -> Path:
    return cache / "indexes" / DEFAULT_INDEX
