"""Ray job entry point for `nic tile`:

    ray job submit --working-dir . -- python jobs/tile.py --config configs/tile.yaml
"""

from _entry import run_stage

if __name__ == "__main__":
    run_stage("tile")
