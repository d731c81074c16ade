"""Differential privacy shared by both sides: the accountant, budgets, central-DP math and ledger records.

``accountant``: epsilon of a history of Gaussian releases (dp-accounting's RDP accountant) and noise
calibration. ``central``: clipping, noise and adaptive clipping as pure numpy over named arrays (the
server's client-level DP, and the client's own clipping under local DP or secure aggregation).
``budget``: a node's persistent per-run budget. ``ledger``: the rows of the privacy ledger.
"""
