#!/usr/bin/env python3
"""Wall time of the engine's page path, side by side, in ns a page.

`engine_rounds` (hypervisor-side/examples/engine_rounds.rs) maps and
unmaps 512 pages a round. This runs it for each (build, path) pair in
turn, many times over, interleaved: a burst of load from a neighbour on
the shared VM then falls on every pair alike, and the minimum of each
pair is the run the neighbours disturbed least. Each pair's set-up (a
run of no rounds, the least of as many) is taken off. Compare pairs of
one run only; absolute times drift from day to day on these machines.

    scripts/engine-wall.py                       # this tree: context, reference
    scripts/engine-wall.py --paths context,engine,hypercall,reference,falling
    scripts/engine-wall.py --rev 58aa01c         # this tree beside an older commit

`--rev REV` builds REV's `engine_rounds` in a worktree of its own under
target/engine-wall/ (kept, so a second run does not build again). The
path `falling` is `context` with PVIOMMU_FALLING set. Rounds and
repetitions: `--rounds` (2000: about 0.2 s a run) and `--times` (25).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES_A_ROUND = 512
PATHS = ("context", "engine", "hypercall", "reference", "extent", "falling")


def build(tree, target_dir):
    """Build `engine_rounds` in `tree`; return the binary's path."""
    env = dict(os.environ, CARGO_TARGET_DIR=target_dir)
    cmd = ["cargo", "build", "-q", "--release", "-p", "pviommu-hv",
           "--features", "sim", "--example", "engine_rounds"]
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    return os.path.join(target_dir, "release", "examples", "engine_rounds")


def build_rev(rev):
    """Build commit `rev` in a worktree under target/engine-wall/."""
    full = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"],
                          cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    base = os.path.join(ROOT, "target", "engine-wall")
    tree = os.path.join(base, "tree-" + full[:12])
    if not os.path.isdir(tree):
        os.makedirs(base, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "-q", "--detach", tree, full],
                       cwd=ROOT, check=True)
    return build(tree, os.path.join(base, "target-" + full[:12]))


def run_once(binary, path, rounds):
    """Seconds of one run of `rounds` rounds."""
    env = dict(os.environ)
    env.pop("PVIOMMU_FALLING", None)
    if path == "falling":
        env["PVIOMMU_FALLING"] = "1"
        path = "context"
    start = time.perf_counter()
    subprocess.run([binary, str(rounds), path], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="context,reference")
    ap.add_argument("--rev", action="append", default=[],
                    help="another commit to build and time beside this tree")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--times", type=int, default=25)
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        sys.exit(f"engine-wall: paths are {', '.join(PATHS)}, not {bad or 'none'}")
    if args.rounds < 1 or args.times < 1:
        sys.exit("engine-wall: --rounds and --times must be at least 1")

    builds = [("this tree", build(ROOT, os.path.join(ROOT, "target")))]
    builds += [(rev, build_rev(rev)) for rev in args.rev]
    pairs = [(label, binary, path) for label, binary in builds for path in paths]
    times = {pair: [] for pair in pairs}
    # Each pair's set-up (the simulated machine, its domains, the process)
    # timed by runs of no rounds, and taken off: what is left is the rounds.
    setup = {pair: [] for pair in pairs}
    for _ in range(args.times):
        for pair in pairs:
            times[pair].append(run_once(pair[1], pair[2], args.rounds))
            setup[pair].append(run_once(pair[1], pair[2], 0))

    print(f"{args.times} interleaved runs of {args.rounds} rounds of "
          f"{PAGES_A_ROUND} pages each, less the set-up (a run of no rounds, "
          f"least of {args.times}); ns a page (map + unmap)")
    print(f"{'build':12} {'path':10} {'min':>7} {'p25':>7} {'median':>7}")
    per_page = 1e9 / (args.rounds * PAGES_A_ROUND)
    for pair in pairs:
        label, _, path = pair
        least_setup = min(setup[pair])
        v = sorted((t - least_setup) * per_page for t in times[pair])
        print(f"{label:12} {path:10} {v[0]:7.1f} {v[len(v) // 4]:7.1f} "
              f"{statistics.median(v):7.1f}")


if __name__ == "__main__":
    main()
