"""`nic tune`: Ray Tune searches over MTL task subsets and hyperparameters."""
