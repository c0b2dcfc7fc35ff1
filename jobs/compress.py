"""Ray job entry point for `nic compress`:

    ray job submit --working-dir . -- python jobs/compress.py --config configs/compress.yaml
"""

from _entry import run_stage

if __name__ == "__main__":
    run_stage("compress")
