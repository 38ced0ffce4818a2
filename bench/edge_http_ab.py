"""A/B of the edge HTTP path between two commits (run by hand): ``python bench/edge_http_ab.py OLD_TREE``.

Starts ``tether edge`` (its defaults: granian, one worker) from this checkout and from
``OLD_TREE`` (a worktree of an earlier commit, run with this checkout's virtual environment
and ``PYTHONPATH`` pointing at the old tree, so only Tether's own code differs), both on
``digits-student``, and drives them with ``wrk`` in interleaved rounds (old then new, then
new then old, and so on) at concurrency 1, 8 and 32. Prints requests/s and p50 per side (medians over the
rounds) and new/old. Used for the "thinner code must not be slower" check of a refactor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.edge_http import Result, digits_script, wrk  # noqa: E402
from harness.agent_process import AgentProcess  # noqa: E402

REPOSITORY = ROOT / "models" / "repository"


def agent(tree: Path, work: Path, name: str) -> AgentProcess:
    """``tether edge`` serving digits-student from ``tree`` (its own code first on the path)."""
    process = AgentProcess(
        work / f"data-{name}",
        repository=REPOSITORY,
        env={"PYTHONPATH": str(tree), "TETHER_MODELS": '["digits-student"]'},
        cwd=tree,
    )
    process.start(ready_timeout_s=120)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("old_tree", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        x = np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)
        script = digits_script(work, x)
        agents = {"old": agent(args.old_tree.resolve(), work, "old")}
        agents["new"] = agent(ROOT, work, "new")
        try:
            samples: dict[tuple[str, int], list[Result]] = {}
            for process in agents.values():  # warm both up
                wrk(f"{process.url}/v2/models/digits-student/infer", script, 8, 1.0)
            for round_ in range(args.rounds):
                order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
                for c in levels:
                    for name in order:
                        url = f"{agents[name].url}/v2/models/digits-student/infer"
                        samples.setdefault((name, c), []).append(wrk(url, script, c, args.seconds))
        finally:
            for process in agents.values():
                process.stop()
    print(f"{args.rounds} interleaved rounds of {args.seconds:g} s, medians\n")
    print("| concurrency | old req/s | new req/s | new/old | old p50 ms | new p50 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in levels:
        old = samples[("old", c)]
        new = samples[("new", c)]
        o_rps = statistics.median(r.rps for r in old)
        n_rps = statistics.median(r.rps for r in new)
        o_p50 = statistics.median(r.p50_ms for r in old)
        n_p50 = statistics.median(r.p50_ms for r in new)
        print(
            f"| {c} | {o_rps:,.0f} | {n_rps:,.0f} | {n_rps / o_rps:.3f} | {o_p50:.3f} | {n_p50:.3f} |"
        )


if __name__ == "__main__":
    main()
