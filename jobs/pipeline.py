"""Ray job entry point for `nic pipeline`:

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo/pipeline.yaml
"""

from _entry import run_stage

if __name__ == "__main__":
    run_stage("pipeline")
