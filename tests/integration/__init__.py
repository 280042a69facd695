"""Integration tier: bitbackd as a subprocess, over real UNIX sockets.

A package, so that its module names (``integration.test_qmp_protocol``) cannot clash with
same-named modules of the other tiers (``tests/unit/test_qmp_protocol.py``), which pytest's
default import mode would refuse to collect side by side.
"""
