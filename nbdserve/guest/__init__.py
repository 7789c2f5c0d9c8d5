"""A Linux guest on an nbdserve overlay running dpkg's workload (``nbdserve reproduce guest``)."""

from .harness import (CLIENTS, DEFAULT_DELAYS, GuestResult, GuestUnavailable, format_guest_results,
                      missing_requirements, parse_console, run_guest, run_guest_once)
from .workload import WorkloadSpec

__all__ = ["CLIENTS", "DEFAULT_DELAYS", "GuestResult", "GuestUnavailable", "WorkloadSpec",
           "format_guest_results", "missing_requirements", "parse_console", "run_guest",
           "run_guest_once"]
