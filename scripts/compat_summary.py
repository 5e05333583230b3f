"""Summarises ``scripts/compat.sh``: one line per host, ``docs/compat.json`` and the README's compatibility table.

Arguments: ``--results DIR`` (the junit XML and logs of each host), ``--partial 0|1`` (1: a part of the suite
ran, nothing is written), then one ``version|folder|tests_rc|tests_s|demo_rc|demo_s`` per host. Rows of hosts that
did not run this time stay in the JSON and the table with the date they were checked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import xml.etree.ElementTree as ET  # noqa: S405  (our own pytest junit files)
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JSON_PATH = REPO / "docs" / "compat.json"
README = REPO / "README.md"
BEGIN, END = "<!-- compat-table:begin -->", "<!-- compat-table:end -->"
#: Release dates of the hosts we know (a ComfyUI folder carries no date of its own).
RELEASED = {"0.3.75": "2025-11", "0.10.0": "2026-01", "0.30.0": "2026-08-02"}


def junit_counts(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skip_reasons": []}
    if not path.is_file():
        return counts
    root = ET.parse(path).getroot()  # noqa: S314
    for case in root.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "errors"
            elif child.tag == "skipped":
                outcome = "skipped"
                counts["skip_reasons"].append(f"{case.get('name')}: {child.get('message', '')}")
        counts[outcome] += 1
    return counts


def version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.]", version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--partial", type=int, default=0)
    parser.add_argument("hosts", nargs="*")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    rows = []
    for item in args.hosts:
        version, folder, tests_rc, tests_s, demo_rc, demo_s = item.split("|")
        c = junit_counts(args.results / f"{version}.xml")
        row = {"comfyui": version, "released": RELEASED.get(version, "unknown"), "checked": today,
               "passed": c["passed"], "failed": c["failed"], "errors": c["errors"], "skipped": c["skipped"],
               "skip_reasons": c["skip_reasons"], "tests_exit": int(tests_rc), "tests_s": int(tests_s),
               "demo_ok": int(demo_rc) == 0, "demo_s": int(demo_s), "folder": folder}
        rows.append(row)
        ok = row["tests_exit"] == 0 and row["demo_ok"]
        print(f"[compat] ComfyUI {version} (released {row['released']}): {c['passed']} passed, {c['failed']} failed, "
              f"{c['errors']} errors, {c['skipped']} skipped in {tests_s} s (pytest exit {tests_rc}); demo "
              f"{'ok' if row['demo_ok'] else 'FAILED'} (exit {demo_rc}, {demo_s} s) -> {'OK' if ok else 'FAIL'}")
        for reason in c["skip_reasons"]:
            print(f"[compat]   skipped {reason}")
    if args.partial:
        print("[compat] part of the suite only: docs/compat.json and the README table are left as they are")
        return 0
    previous = json.loads(JSON_PATH.read_text(encoding="utf-8")).get("hosts", []) if JSON_PATH.is_file() else []
    ran = {r["comfyui"] for r in rows}
    hosts = sorted([r for r in previous if r["comfyui"] not in ran] + rows, key=lambda r: version_key(r["comfyui"]))
    for r in hosts:
        r.pop("folder", None)
    constraints = (REPO / "scripts" / "constraints.txt").read_text(encoding="utf-8")
    pins = [line for line in constraints.splitlines() if line and not line.startswith("#")]
    JSON_PATH.write_text(json.dumps({"pins": pins, "hosts": hosts}, indent=2) + "\n", encoding="utf-8")
    table = ["| ComfyUI | released | checked | tests | demo |", "|---|---|---|---|---|"]
    for r in hosts:
        tests = f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
        table.append(f"| {r['comfyui']} | {r['released']} | {r['checked']} | {tests} | "
                     f"{'ok' if r['demo_ok'] else 'FAILED'} |")
    text = README.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        README.write_text(head + BEGIN + "\n" + "\n".join(table) + "\n" + END + tail, encoding="utf-8")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
