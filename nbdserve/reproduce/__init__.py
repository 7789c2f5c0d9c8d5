"""``nbdserve reproduce``: the 2012 qcow2 corruption, end to end over NBD with real clients."""

from .runner import RunResult, run_scenario
from .scenarios import SCENARIOS, Scenario

__all__ = ["RunResult", "run_scenario", "SCENARIOS", "Scenario"]
