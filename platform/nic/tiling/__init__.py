"""The `nic tile` stage: tissue detection and tile grids for a collection of slides, on Ray Data."""
