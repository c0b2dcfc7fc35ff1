"""Ray job entry point for `nic train-encoder`:

    ray job submit --working-dir . -- python jobs/train_encoder.py --config configs/train_encoder.yaml
"""

from _entry import run_stage

if __name__ == "__main__":
    run_stage("train-encoder")
