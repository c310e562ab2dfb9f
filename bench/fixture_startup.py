"""Start-up time of mailboxd.testing.MailServer, in-thread and as a subprocess.

Each measurement runs in a fresh Python process (a small snippet, with the
working tree on PYTHONPATH), because the first start in a process also starts
the reactor thread and imports Twisted's TLS and mail modules; later starts in
the same process do not. Times are from before ``start()`` until it returns,
when every listener accepts connections. Everything binds 127.0.0.1 only.

    python bench/fixture_startup.py            # 5 fresh processes, 10 later starts each
    python bench/fixture_startup.py -r 10 -n 50 --tls
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from mailboxd.testing import MailServer
imported = time.perf_counter() - t0
process, tls, n = sys.argv[1] == "1", sys.argv[2] == "1", int(sys.argv[3])
kwargs = {"tls": True} if tls else {}
if process:
    kwargs["process"] = True

def once():
    server = MailServer(**kwargs)
    t = time.perf_counter()
    server.start()
    started = time.perf_counter() - t
    t = time.perf_counter()
    server.stop()
    return started, time.perf_counter() - t

first, first_stop = once()
later = [once() for _ in range(n)]
print(json.dumps({
    "import": imported,
    "first": first,
    "later": [s for s, _ in later],
    "stop": [first_stop] + [s for _, s in later],
}))
"""

AIMS = {"in-thread": 0.3, "subprocess": 1.5}


def run(process: bool, tls: bool, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(int(process)), str(int(tls)), str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"bench: the snippet failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-r", "--runs", type=int, default=5, help="fresh processes per mode")
    p.add_argument("-n", "--starts", type=int, default=10, help="later starts per process")
    p.add_argument("--tls", action="store_true", help="tls=True (a certificate per start)")
    p.add_argument("--in-thread-only", action="store_true", help="skip the subprocess mode")
    args = p.parse_args()

    modes = [("in-thread", False)] + ([] if args.in_thread_only else [("subprocess", True)])
    print(f"python {sys.version.split()[0]}, tls={args.tls}, {args.runs} fresh processes per mode")
    for name, process in modes:
        results = [run(process, args.tls, args.starts) for _ in range(args.runs)]
        imports = [r["import"] for r in results]
        firsts = [r["first"] for r in results]
        later = [t for r in results for t in r["later"]]
        stops = [t for r in results for t in r["stop"]]
        aim = AIMS[name]
        print(f"\n{name} (aim: start under {aim} s)")
        print(f"  import mailboxd.testing:  median {ms(statistics.median(imports))}")
        print(
            f"  first start in a process: median {ms(statistics.median(firsts))}"
            f"  (min {ms(min(firsts))}, max {ms(max(firsts))}, {len(firsts)} processes)"
        )
        if later:
            print(
                f"  later starts:             median {ms(statistics.median(later))}"
                f"  (min {ms(min(later))}, max {ms(max(later))}, {len(later)} starts)"
            )
        print(f"  stop:                     median {ms(statistics.median(stops))}")
        worst = max(firsts + later)
        print(f"  {'within' if worst < aim else 'OVER'} the aim (slowest start {ms(worst)})")


if __name__ == "__main__":
    main()
