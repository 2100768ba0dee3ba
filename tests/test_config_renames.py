"""Renamed config keys (rooftop_m2f/config.py RENAMED_KEYS): the old names are read as the new
ones, in a YAML file (also through _BASE_) and as KEY VALUE overrides, with one warning line
naming both; a misspelt key is still the one-line error with the closest key."""
import logging

import pytest

from conftest import TINY_CONFIG

LOGGER = "rooftop_m2f.config"
OLD_YAML = f"""_BASE_: {TINY_CONFIG}
ROOFTOP:
  AUG:
    RESIZE: 96
  TILE:
    TTA: ["hflip"]
  CLASS_WEIGHTS: [1.0, 2.0, 3.0, 4.0]
"""


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


def _check_new_values(cfg):
    assert cfg.ROOFTOP.INPUT_SIZE == 96
    assert list(cfg.ROOFTOP.TTA) == ["hflip"]
    assert list(cfg.ROOFTOP.LOSS.PER_CLASS_WEIGHTS) == [1.0, 2.0, 3.0, 4.0]
    assert "RESIZE" not in cfg.ROOFTOP.AUG and "TTA" not in cfg.ROOFTOP.TILE
    assert "CLASS_WEIGHTS" not in cfg.ROOFTOP


def _lines_name(lines, old, new):
    return sum(old in line and new in line and "deprecated" in line for line in lines) == 1


def test_old_names_in_a_yaml_file(tmp_path, caplog):
    from rooftop_m2f.engine.setup import load_cfg

    path = tmp_path / "old.yaml"
    path.write_text(OLD_YAML)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = load_cfg(str(path))
    _check_new_values(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 3 and all(str(path) in line for line in lines)
    assert _lines_name(lines, "ROOFTOP.AUG.RESIZE", "ROOFTOP.INPUT_SIZE")
    assert _lines_name(lines, "ROOFTOP.TILE.TTA", "ROOFTOP.TTA")
    assert _lines_name(lines, "ROOFTOP.CLASS_WEIGHTS", "ROOFTOP.LOSS.PER_CLASS_WEIGHTS")


def test_old_name_in_a_base_file_is_overridden_by_the_new_name(tmp_path, caplog):
    from rooftop_m2f.engine.setup import load_cfg

    (tmp_path / "base.yaml").write_text(OLD_YAML)
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nROOFTOP:\n  INPUT_SIZE: 64\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = load_cfg(str(tmp_path / "child.yaml"))
    assert cfg.ROOFTOP.INPUT_SIZE == 64 and list(cfg.ROOFTOP.TTA) == ["hflip"]
    assert len(_warnings(caplog)) == 3


def test_old_names_as_overrides(caplog):
    from rooftop_m2f.engine.setup import load_cfg

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = load_cfg(TINY_CONFIG, ["ROOFTOP.AUG.RESIZE", "96", "ROOFTOP.TILE.TTA", "['hflip']",
                                     "ROOFTOP.CLASS_WEIGHTS", "[1.0, 2.0, 3.0, 4.0]"])
    _check_new_values(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 3 and all("command line" in line for line in lines)
    assert _lines_name(lines, "ROOFTOP.AUG.RESIZE", "ROOFTOP.INPUT_SIZE")
    assert _lines_name(lines, "ROOFTOP.TILE.TTA", "ROOFTOP.TTA")
    assert _lines_name(lines, "ROOFTOP.CLASS_WEIGHTS", "ROOFTOP.LOSS.PER_CLASS_WEIGHTS")


def test_new_names_give_no_warning(caplog):
    from rooftop_m2f.engine.setup import load_cfg

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cfg = load_cfg(TINY_CONFIG, ["ROOFTOP.INPUT_SIZE", "96", "ROOFTOP.TTA", "['hflip']",
                                     "ROOFTOP.LOSS.PER_CLASS_WEIGHTS", "[1.0, 2.0, 3.0, 4.0]"])
    _check_new_values(cfg)
    assert not _warnings(caplog)


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_a_misspelt_key_is_still_the_one_line_error(tmp_path, where):
    from rooftop_m2f.cli import ConfigError
    from rooftop_m2f.engine.setup import load_cfg

    if where == "yaml":
        path = tmp_path / "typo.yaml"
        path.write_text(f"_BASE_: {TINY_CONFIG}\nROOFTOP:\n  INPUT_SIZ: 96\n")
        args = (str(path),)
    else:
        args = (TINY_CONFIG, ["ROOFTOP.INPUT_SIZ", "96"])
    with pytest.raises(ConfigError) as err:
        load_cfg(*args)
    message = str(err.value)
    assert "\n" not in message
    assert "ROOFTOP.INPUT_SIZ is not a config key" in message
    assert "did you mean ROOFTOP.INPUT_SIZE?" in message
