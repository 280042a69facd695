"""The qcow2 format driver: mapping, allocation, refcounts, creation and checking."""
