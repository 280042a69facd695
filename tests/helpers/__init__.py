"""Helpers shared by the test suite (processes, tool paths). Import as ``helpers.procs``."""
