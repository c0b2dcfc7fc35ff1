"""Ray Train loops (encoders, downstream models) and the helpers they share (nic.train.common).

Submodules are imported on demand: importing `nic.train` must not pull in Ray or torch.
"""
