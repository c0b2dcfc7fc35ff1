"""Ray job entry point for `nic train-downstream`:

    ray job submit --working-dir . -- python jobs/train_downstream.py --config configs/train_downstream.yaml
"""

from _entry import run_stage

if __name__ == "__main__":
    run_stage("train-downstream")
