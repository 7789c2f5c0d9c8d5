"""``nbdserve reproduce``: the 2012 qcow2 corruption, end to end over NBD with real clients.

runner.py runs a scenario (it imports the server, so import it where needed);
scenarios.py and model.py are plain data and arithmetic."""

from .scenarios import SCENARIOS, Scenario

__all__ = ["SCENARIOS", "Scenario"]
