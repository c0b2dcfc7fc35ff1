"""Slide-level models on feature grids: labels, splits, crops, the grid CNN and attention MIL, losses
(including the Cox partial likelihood), metrics with bootstrap CIs, test-time averaging and plots.

The Ray Train loop and the `nic train-downstream` stage live in `nic.train`; this package holds the
pieces that do not need Ray, so they can be tested and reused on their own.
"""
