"""zeroserve/flags.py: flags made from config fields carry their defaults and help, once."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from zeroserve import flags
from zeroserve.broker import cli as broker_cli
from zeroserve.config import BrokerConfig, EchoConfig, GatewayConfig, LLMConfig, TensorConfig
from zeroserve.gateway import cli as gateway_cli
from zeroserve.workers import worker as worker_cli


@dataclasses.dataclass(frozen=True)
class Knobs:
    rate: float = flags.knob(1.5, "how fast")
    count: int = flags.knob(3, "how many")
    name: str = flags.knob("x", "what")
    loud: bool = flags.knob(False, "whether")
    on: bool = flags.knob(True, "whether not")


def test_flags_take_type_default_and_help_from_the_fields() -> None:
    ap = argparse.ArgumentParser()
    names = flags.names(Knobs)
    flags.add(ap, Knobs, names)
    assert Knobs(**flags.values(ap.parse_args([]), names)) == Knobs()
    got = Knobs(**flags.values(ap.parse_args(["--rate", "2", "--count", "7", "--loud", "--no-on"]),
                               names))
    assert got == Knobs(rate=2.0, count=7, loud=True, on=False)
    assert "how many" in ap.format_help()
    with pytest.raises(SystemExit):
        ap.parse_args(["--count", "seven"])


@pytest.mark.parametrize("cli, cls, required", [
    (broker_cli, BrokerConfig, ("f", "b", "a")), (gateway_cli, GatewayConfig, ("b",))])
def test_the_command_lines_default_to_the_dataclasses(cli, cls, required) -> None:
    parsed = cli.config_from_args(cli.build_parser().parse_args([]))
    defaults = cls(*required)
    for name in cli.FLAGS:
        assert getattr(parsed, name) == getattr(defaults, name), name
        assert dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(
            name)].metadata.get("help"), f"{name} has no help"


def test_the_worker_takes_its_engines_own_config() -> None:
    def parse(*argv: str):
        return worker_cli.config_from_args(worker_cli.build_parser().parse_args(argv), (0,))

    assert parse().engine == EchoConfig()
    llm = parse("--engine", "llm", "--max-num-seqs", "3", "--no-prefix-caching", "--device",
                "cuda", "--slot", "2")
    assert llm.engine == LLMConfig(max_num_seqs=3, prefix_caching=False)
    assert llm.device == "cuda:2"  # one GPU per slot
    assert parse("--engine", "tensor", "--module", "m:f", "--max-batch-size", "8").engine == \
        TensorConfig(module="m:f", max_batch_size=8)
