#!/usr/bin/env python3
"""Splits a `terraform apply` of examples/qemu into phases, from Terraform's log (TF_LOG=INFO).

The provider reports, per node, when it saw the VM in its firmware, when the image's init
started (with the kernel's uptime then), when the bootstrapper reported it was up, and, for
the cluster, when the first control plane attested, when Init returned and when each node
joined. Phase boundaries the provider observes by polling are accurate to about 0.5 s.

usage: bench_split.py <terraform log>
"""

import re
import sys
from datetime import datetime

LINE = re.compile(r"^(\S+) \[(\w+)\]\s+(.*)$")
NODE = re.compile(r"node (\S+) \[[0-9.]+ s\]: (.*)")
KERNEL = re.compile(r"kernel up after ([0-9.]+) s")


def when(stamp):
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def main(path):
    start = image = ready = attested = initialized = None
    nodes = {}
    joined = {}
    for raw in open(path, encoding="utf-8", errors="replace"):
        m = LINE.match(raw.strip())
        if not m:
            continue
        t, text = when(m.group(1)), m.group(3)
        if start is None and "Starting apply for constellation_image" in text:
            start = t
        if "assembled image" in text:
            image = t
        if "cluster ready after" in text:
            ready = t
        m = re.search(r"node (\S+) attested against the image measurements", text)
        if m and attested is None:
            attested = t
        if re.search(r"node (\S+) initialized the cluster", text):
            initialized = t
        m = re.search(r"node (\S+) joined and attested", text)
        if m:
            joined.setdefault(m.group(1), t)
        m = NODE.search(text)
        if not m:
            continue
        name, phase = m.group(1), m.group(2)
        n = nodes.setdefault(name, {})
        if phase.startswith("firmware"):
            n.setdefault("firmware", t)
        elif phase.startswith("kernel up"):
            n.setdefault("init", t)
            n.setdefault("kernel", float(KERNEL.search(phase).group(1)))
        elif phase.startswith("bootstrapper up"):
            n.setdefault("up", t)
    if None in (start, image, ready, attested, initialized) or not nodes:
        sys.exit(f"{path}: not a complete apply of examples/qemu with TF_LOG=INFO")

    print(f"{'node':32} {'firmware':>9} {'kernel':>7} {'init+bootstrapper':>18}")
    for name, n in sorted(nodes.items()):
        if not {"firmware", "init", "kernel", "up"} <= n.keys():
            print(f"{name:32} (incomplete: {sorted(n)})")
            continue
        firmware = n["init"] - n["kernel"] - n["firmware"]
        print(f"{name:32} {firmware:8.1f}s {n['kernel']:6.1f}s {n['up'] - n['init']:17.1f}s")
    first = min(nodes, key=lambda k: nodes[k].get("firmware", float("inf")))
    cp = nodes[first]
    print()
    print("critical path of the apply:")
    rows = [
        ("image build (constellation_image)", image - start),
        ("provider: cluster folder, first VM started", cp["firmware"] - image),
        (f"firmware ({first})", cp["init"] - cp["kernel"] - cp["firmware"]),
        (f"kernel ({first})", cp["kernel"]),
        (f"init + bootstrapper up ({first})", cp["up"] - cp["init"]),
        ("attest (aTLS) of the first control plane", attested - cp["up"]),
        ("Init", initialized - attested),
        ("joins: last node attested with the cluster ID", max(joined.values()) - initialized),
    ]
    for what, secs in rows:
        print(f"  {what:48} {secs:6.1f} s")
    print(f"  {'total (image build to cluster ready)':48} {ready - start:6.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
