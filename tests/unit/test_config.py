from __future__ import annotations

import pytest

from ragmix.config import load_config
from ragmix.errors import ValidationError


def test_precedence_cli_over_env_over_file(tmp_path):
    f = tmp_path / "ragmix.toml"
    f.write_text('[serve]\nmax-top-k = 7\nport = 6000\nhost = "0.0.0.0"\n')
    env = {"RAGMIX_PORT": "6001", "RAGMIX_CONFIG": str(f)}
    c = load_config({"port": 6002}, env=env)
    assert (c.max_top_k, c.host, c.port) == (7, "0.0.0.0", 6002)
    assert load_config({}, env=env).port == 6001


def test_unknown_file_setting_is_named(tmp_path):
    f = tmp_path / "ragmix.toml"
    f.write_text("max_topk = 3\n")
    with pytest.raises(ValidationError, match="unknown setting 'max_topk'"):
        load_config({"config": str(f)}, env={})


def test_inconsistent_limits_refused():
    with pytest.raises(ValidationError, match="default_top_k"):
        load_config({"max_top_k": 2}, env={})
    with pytest.raises(ValidationError, match="must be a number"):
        load_config({}, env={"RAGMIX_MAX_TOP_K": "many"})
