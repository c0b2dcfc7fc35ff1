"""Ray job entry point for `nic synth`:

    ray job submit --working-dir . -- python jobs/synth.py --config configs/synth.yaml
"""

from _entry import run_stage

if __name__ == "__main__":
    run_stage("synth")
