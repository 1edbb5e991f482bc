"""Shared benchmark plumbing: argument parsing, timing, JSON and PNG output.

Every benchmark writes a JSON list of records, one per measured
configuration: {"impl": ..., "config": {...}, <figures>}; our implementations
are named `tfrec_fast.*`, TensorFlow's own paths `tf.*`.
"""

import argparse
import json
import resource
import statistics
import time


def parser(description, repeats_default=5, repeats_help=None):
    """The flags every benchmark takes (--json, --png, --quick, --repeats);
    a benchmark adds its own to the parser it returns."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", default=None, help="write records here")
    parser.add_argument("--png", default=None, help="write a plot here")
    parser.add_argument("--quick", action="store_true",
                        help="reduced set, under two minutes")
    parser.add_argument("--repeats", type=int, default=repeats_default,
                        help=repeats_help)
    return parser


def parse_args(description):
    return parser(description).parse_args()


def median_seconds(fn, repeats, warmup=1):
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def proc_status_mb(field):
    """A memory figure of this process from /proc/self/status, in MB.

    VmHWM (peak resident set) rather than ru_maxrss: on Linux ru_maxrss
    survives exec, so a child process would report its parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def write(records, args):
    text = json.dumps(records, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
