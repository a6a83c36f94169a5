"""Evaluation of CT-SMA outputs on held-out data (regression agreement: :mod:`.regression`)."""
