"""Start-up of small jobs: where the seconds before the first useful work go (issue 16 item 1).

Run:  .venv/bin/python benchmarks/bench_startup.py [--slide ../shared/data/slides/small_HE.svs]
          [--encoder mean-rgb] [--repeats 3] [--write]

A user's first command is one slide on a laptop, and there `nic` used to lose to the tools it
replaces by a fixed cost of several seconds that has nothing to do with the slide. This script
times that fixed cost phase by phase, each phase in fresh processes (nothing warm from an earlier
phase, which is what a user's command sees), the median of --repeats runs:

  interpreter      `python -c pass`
  CLI import       `python -c "import nic.cli.main"`: what every command pays before parsing
  help             `nic --help`, `nic tile --help`: must not import torch or ray (a test checks)
  library imports  `import ray`, `import ray.data`, `import torch` alone, for scale
  embedded Ray     `nic.runtime.connect()` in a fresh process (ray.init of a local instance),
                   then the first trivial Ray task (a worker must be ready to run it)
  whole commands   `nic tile` and `nic compress` (--encoder) of the one slide into a new folder,
                   each in its own process with probes: CLI and stage imports, loading the
                   encoder (compress), connecting to Ray, from the pipeline's start to its first
                   encoded batch (Ray Data planning, actor start, reading and encoding one batch),
                   the slide's own work (tile: the worker's seconds for the slide; compress: the
                   actors' read + encode seconds), and the whole command as the shell sees it.

The numbers are wall times, so they are only comparable within one run on a quiet machine; the
load average at the end is recorded beside them. `--write` puts the table into
benchmarks/results/startup.md and rebuilds benchmarks/RESULTS.md (collect_results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import cpu_model, ram_gib  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "startup.md"
PYTHON = sys.executable
NIC = str(Path(PYTHON).with_name("nic"))
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "small_HE.svs"

#: Run inside the probed process (`--probe`): wraps nic's seams to record when each phase ends.
#: Stages import `connect` and `Progress` by name, so the wrappers are installed before the stage
#: modules are imported; `encoder_facts` is looked up in its module at call time.
_PROBE_SETUP = """
import json, sys, time
marks = {"python_started": time.time()}
import nic.runtime as runtime
marks["runtime_imported"] = time.time()
_connect = runtime.connect
def connect(*a, **k):
    marks.setdefault("connect_start", time.time())
    info = _connect(*a, **k)
    marks.setdefault("connect_end", time.time())
    return info
runtime.connect = connect
_update = runtime.Progress.update
def update(self, *a, **k):
    marks.setdefault("first_progress", time.time())
    return _update(self, *a, **k)
runtime.Progress.update = update
import nic.cli.main as cli
marks["cli_imported"] = time.time()
command = sys.argv[2]
stage = {s.name: s for s in cli.STAGES}[command]
cli._import(stage.run)
marks["stage_imported"] = time.time()
if command == "compress":
    import nic.compress.stage as cs
    _facts = cs.encoder_facts
    def encoder_facts(*a, **k):
        marks["encoder_start"] = time.time()
        facts = _facts(*a, **k)
        marks["encoder_end"] = time.time()
        return facts
    cs.encoder_facts = encoder_facts
code = cli.main(sys.argv[2:])
marks["main_returned"] = time.time()
marks["exit_code"] = code
with open(sys.argv[1], "w") as f:
    json.dump(marks, f)
"""

_CONNECT = """
import time
t0 = time.time()
from nic.config.base import RayOptions
from nic.runtime import connect
import ray
t1 = time.time()
connect(RayOptions())
t2 = time.time()
ray.get(ray.remote(lambda: 1).remote())
t3 = time.time()
print({"imports": t1 - t0, "connect": t2 - t1, "first_task": t3 - t2})
"""


def machine() -> str:
    return (f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, {ram_gib():.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def clean_env() -> dict[str, str]:
    """The environment of a user's embedded run: no cluster address, nic importable."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "platform"), env.get("PYTHONPATH")]))
    return env


def wall(cmd: list[str], cwd: Path | None = None) -> float:
    """Seconds a command takes as the shell sees it (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def import_time(module: str) -> float:
    """Seconds `import module` takes in a fresh interpreter, the interpreter's own start excluded."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    done = subprocess.run([PYTHON, "-c", code], check=True, capture_output=True, text=True, env=clean_env())
    return float(done.stdout.strip().splitlines()[-1])


def embedded_ray() -> dict[str, float]:
    """ray.init of nic's embedded instance and the first task, in a fresh process."""
    done = subprocess.run([PYTHON, "-c", _CONNECT], check=True, capture_output=True, text=True, env=clean_env(),
                          cwd=tempfile.gettempdir())
    return eval(done.stdout.strip().splitlines()[-1])  # a dict literal printed by _CONNECT


def probed_command(command: str, args: list[str], workdir: Path) -> dict[str, float]:
    """One `nic <command>` in a fresh process with phase probes; seconds of each phase."""
    out = workdir / f"{command}-out"
    shutil.rmtree(out, ignore_errors=True)
    marks_file = workdir / "marks.json"
    argv = [PYTHON, "-c", _PROBE_SETUP, str(marks_file), command, *args, "--out", str(out)]
    start = time.time()
    subprocess.run(argv, check=True, cwd=workdir, env=clean_env(), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    end = time.time()
    marks = json.loads(marks_file.read_text())
    if marks["exit_code"] != 0:
        raise RuntimeError(f"nic {command} exited {marks['exit_code']}")
    phases = {
        "interpreter start": marks["python_started"] - start,
        "CLI + stage imports": marks["stage_imported"] - marks["python_started"],
    }
    if "encoder_start" in marks:
        phases["loading the encoder"] = marks["encoder_end"] - marks["encoder_start"]
    if "connect_start" in marks:
        phases["connecting to Ray (ray.init)"] = marks["connect_end"] - marks["connect_start"]
    if command == "compress":
        run = json.loads((out / "compress_run.json").read_text())
        phases["pipeline start to first encoded batch"] = run["first_batch_s"]
        phases["the slide's work (actors' read + encode)"] = run["actor_read_s"] + run["actor_encode_s"]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out / "slides.parquet").to_pylist()
        if "first_progress" in marks:  # the stage's progress line for its first finished slide
            phases["start to first finished slide"] = marks["first_progress"] - start
        phases["the slide's work (worker seconds)"] = sum(float(r["seconds"] or 0) for r in rows)
    phases["whole command"] = end - start
    return phases


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = list(dict.fromkeys(k for run in runs for k in run))
    return {k: statistics.median(run[k] for run in runs if k in run) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="the one slide of the small jobs")
    ap.add_argument("--encoder", default="mean-rgb", help="encoder of the compress job (a name or a folder)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every measure (median)")
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(REPO)} and RESULTS.md")
    args = ap.parse_args(argv)
    slide = args.slide.resolve()

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="nic-bench-startup-") as tmp:
        workdir = Path(tmp)
        simple = {
            "python -c pass": [PYTHON, "-c", "pass"],
            "python -c 'import nic.cli.main'": [PYTHON, "-c", "import nic.cli.main"],
            "nic --help": [NIC, "--help"],
            "nic tile --help": [NIC, "tile", "--help"],
        }
        for label, cmd in simple.items():
            rows.append((label, statistics.median(wall(cmd, workdir) for _ in range(args.repeats))))
            print(f"{label}: {rows[-1][1]:.2f} s", flush=True)
        for module in ("ray", "ray.data", "torch"):
            rows.append((f"import {module} (alone)", statistics.median(import_time(module)
                                                                       for _ in range(args.repeats))))
            print(f"{rows[-1][0]}: {rows[-1][1]:.2f} s", flush=True)
        ray_runs = [embedded_ray() for _ in range(args.repeats)]
        for key, label in (("connect", "embedded Ray: nic.runtime.connect (ray.init)"),
                           ("first_task", "embedded Ray: first trivial task after connect")):
            rows.append((label, statistics.median(r[key] for r in ray_runs)))
            print(f"{label}: {rows[-1][1]:.2f} s", flush=True)

        commands = {
            "tile": ["--slides", str(slide)],
            "compress": ["--slides", str(slide), "--encoder", args.encoder],
        }
        per_command: dict[str, dict[str, float]] = {}
        for command, cargs in commands.items():
            runs = [probed_command(command, cargs, workdir) for _ in range(args.repeats)]
            per_command[command] = median_phases(runs)
            for label, value in per_command[command].items():
                print(f"nic {command}: {label}: {value:.2f} s", flush=True)

    lines = [
        "# Start-up of small jobs",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_startup.py --slide {args.slide} --encoder {args.encoder} "
        f"--repeats {args.repeats} --write`",
        "",
        f"Machine: {machine()}; load average at the end {load()}. Wall times, medians of {args.repeats} runs, "
        "each in a fresh process (no Ray running beforehand, no RAY_ADDRESS: the embedded instance a user's "
        f"first command starts). Slide: `{args.slide.name}`.",
        "",
        "| what | seconds |",
        "| --- | ---: |",
        *[f"| {label} | {value:.2f} |" for label, value in rows],
        "",
        f"One slide, phase by phase (`nic tile`; `nic compress --encoder {args.encoder}`); a phase a command "
        "does not have is left empty:",
        "",
        "| phase | nic tile | nic compress |",
        "| --- | ---: | ---: |",
    ]
    labels = list(dict.fromkeys([*per_command["tile"], *per_command["compress"]]))
    labels.append(labels.pop(labels.index("whole command")))
    for label in labels:
        cells = [f"{per_command[c][label]:.2f}" if label in per_command[c] else "" for c in ("tile", "compress")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Phases of a command overlap nothing (they follow one another in the driver) except the slide's own "
        "work, which is measured inside the workers and lies within the later phases; the whole command minus "
        "that work is the fixed cost a small job pays.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        import collect_results

        collect_results.main()
        print(f"wrote {RESULTS} and {RESULTS.parent.parent / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
