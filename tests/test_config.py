"""The one config set-up: a misspelt key, in a YAML file or an override, is one line naming it
and the closest valid key; a tool that is not a run gets a frozen config and writes nothing."""
import argparse

import pytest

from conftest import TINY_CONFIG
from rooftop_m2f.cli import ConfigError
from rooftop_m2f.engine import setup


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_a_misspelt_key_is_one_line_with_the_closest_key(tmp_path, where):
    if where == "yaml":
        path = tmp_path / "typo.yaml"
        path.write_text(f"_BASE_: {TINY_CONFIG}\nROOFTOP:\n  INPUT_SIZ: 96\n")
        args = argparse.Namespace(config_file=str(path), opts=[])
    else:
        args = argparse.Namespace(config_file=TINY_CONFIG, opts=["ROOFTOP.INPUT_SIZ", "96"])
    with pytest.raises(ConfigError) as err:
        setup(args)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(args.config_file) if where == "yaml" else "command line")
    assert "ROOFTOP.INPUT_SIZ is not a config key; did you mean ROOFTOP.INPUT_SIZE?" in message


def test_a_tool_that_is_not_a_run_gets_a_frozen_config_and_writes_nothing(tmp_path):
    cfg = setup(argparse.Namespace(config_file=TINY_CONFIG,
                                   opts=["ROOFTOP.INPUT_SIZE", "96", "OUTPUT_DIR", str(tmp_path / "o")]))
    assert cfg.ROOFTOP.INPUT_SIZE == 96 and cfg.is_frozen() and cfg.MODEL.DEVICE == "cpu"
    assert not (tmp_path / "o").exists()
