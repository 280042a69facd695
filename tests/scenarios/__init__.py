"""Scenario tier: whole backup stories (iotest 124's and beyond) against bitbackd and QEMU 7.2.

A package, so that its module names cannot clash with same-named modules of other tiers.
"""
