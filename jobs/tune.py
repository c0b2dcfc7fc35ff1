"""Ray job entry point for `nic tune`:

    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune.yaml
"""

from _entry import run_stage

if __name__ == "__main__":
    run_stage("tune")
