"""Summarises ``scripts/compat.sh``: one line per host, ``docs/compat.json`` and the host table of docs/hosts.md.

Arguments: ``--results DIR`` (the junit XML and logs of each host), ``--partial 0|1`` (1: a part of the suite
ran, nothing is written), then one ``version|folder|tests_rc|tests_s|demo_rc|demo_s`` per host. Rows of hosts that
did not run this time stay in the JSON and the table with the date they were checked.

The compatibility matrix with other packs (``<version>.matrix.json`` of each host, written by the tests'
``matrix`` fixture) goes into ``docs/compat.json`` (key ``matrix``) and ``docs/compatibility.md``, also after a
partial run that ran the matrix tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import xml.etree.ElementTree as ET  # noqa: S405  (our own pytest junit files)
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JSON_PATH = REPO / "docs" / "compat.json"
MATRIX_DOC = REPO / "docs" / "compatibility.md"
HOSTS_DOC = REPO / "docs" / "hosts.md"
BEGIN, END = "<!-- compat-table:begin -->", "<!-- compat-table:end -->"
#: Release dates of the hosts we know (a ComfyUI folder carries no date of its own).
RELEASED = {"0.3.75": "2025-11", "0.10.0": "2026-01", "0.30.0": "2026-08-02"}


def junit_counts(path: Path) -> dict:
    """Outcomes of a pytest junit file: one per test case (a failure or error wins over a pass, e.g. an error
    in teardown after the test passed). ``found`` is False when there is no file (pytest did not run)."""
    counts = {"found": path.is_file(), "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skip_reasons": []}
    if not counts["found"]:
        return counts
    root = ET.parse(path).getroot()  # noqa: S314
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        outcome = ("errors" if "error" in tags else "failed" if "failure" in tags
                   else "skipped" if "skipped" in tags else "passed")
        if outcome == "skipped":
            reason = next(child.get("message", "") for child in case if child.tag == "skipped")
            counts["skip_reasons"].append(f"{case.get('classname', '')}::{case.get('name')}: {reason}")
        counts[outcome] += 1
    return counts


def version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.]", version))


def host_row(item: str, results: Path, today: str) -> dict:
    """The result of one host from its ``version|folder|tests_rc|tests_s|demo_rc|demo_s`` and junit file."""
    version, folder, tests_rc, tests_s, demo_rc, demo_s = item.split("|")
    c = junit_counts(results / f"{version}.xml")
    return {"comfyui": version, "released": RELEASED.get(version, "unknown"), "checked": today,
            "passed": c["passed"], "failed": c["failed"], "errors": c["errors"], "skipped": c["skipped"],
            "skip_reasons": c["skip_reasons"], "tests_exit": int(tests_rc), "tests_s": int(tests_s),
            "demo_ok": int(demo_rc) == 0, "demo_exit": int(demo_rc), "demo_s": int(demo_s), "folder": folder, "junit_found": c["found"]}


def summary_line(row: dict) -> str:
    ok = row["tests_exit"] == 0 and row["demo_ok"]
    tests = (f"{row['passed']} passed, {row['failed']} failed, {row['errors']} errors, {row['skipped']} skipped"
             if row["junit_found"] else "no test results (pytest did not run: see the log)")
    return (f"[compat] ComfyUI {row['comfyui']} (released {row['released']}): {tests} in {row['tests_s']} s "
            f"(pytest exit {row['tests_exit']}); demo {'ok' if row['demo_ok'] else 'FAILED'} "
            f"(exit {row['demo_exit']}, {row['demo_s']} s) -> {'OK' if ok else 'FAIL'}")


def table(hosts: list[dict]) -> list[str]:
    lines = ["| ComfyUI | released | checked | tests | demo |", "|---|---|---|---|---|"]
    for r in hosts:
        tests = f"{r['passed']} passed, {r['failed']} failed, {r['errors']} errors, {r['skipped']} skipped"
        lines.append(f"| {r['comfyui']} | {r['released']} | {r['checked']} | {tests} | "
                     f"{'ok' if r['demo_ok'] else 'FAILED'} |")
    return lines


def matrix_of_run(results: Path, versions: list[str], today: str) -> dict[str, dict]:
    """The matrix rows each host of this run recorded: {version: {"checked": date, "rows": [...]}}."""
    found = {}
    for version in versions:
        path = results / f"{version}.matrix.json"
        if path.is_file():
            rows = json.loads(path.read_text(encoding="utf-8")).get("rows", [])
            if rows:
                found[version] = {"checked": today, "rows": rows}
    return found


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def matrix_doc(matrix: dict[str, dict], nodes: list[str]) -> str:
    """docs/compatibility.md from the recorded rows (a failed test shows as FAILED, never as its intended result)."""
    lines = [
        "# Compatibility with other packs",
        "",
        "Generated by `scripts/compat.sh --nodes DIR...` from the rows the tests of `tests/test_compat_packs.py` (and",
        "`tests/test_flux_kv_cache.py`) record; do not edit by hand. Apply Sparse Context at keep 0.5 on tiny real",
        "FLUX models, both node orders. *composes*: the image equals an exact oracle (the dense model with the dropped",
        "reference tokens hidden as keys, or the same settings on a core model with the same weights); *refused*: the",
        "run stops with the message shown before any image is returned; *pack fails by itself*: the pack raises on",
        "that ComfyUI with or without SparseContext. Rows of a pack that was not given to the run are absent.",
        "",
    ]
    for version in sorted(matrix, key=version_key):
        entry = matrix[version]
        lines += [f"## ComfyUI {version} (checked {entry['checked']})", "",
                  "| pack (snapshot) | model | node order | mode | result | evidence / message |",
                  "|---|---|---|---|---|---|"]
        rows = sorted(entry["rows"], key=lambda r: (r.get("pack", ""), r.get("family", ""), r.get("order", ""),
                                                    r.get("mode", "")))
        shown = set()
        for r in rows:
            result = r.get("result", "")
            if r.get("outcome") == "failed" or (r.get("outcome") == "passed" and not result):
                result = "FAILED (test failed: see the log)"
            elif r.get("outcome") == "skipped" and result != "pack does not load":
                result = "not run"
            line = ("| " + " | ".join(_cell(r.get(k) or "") for k in ("pack", "family", "order", "mode"))
                    + f" | {_cell(result)} | {_cell(r.get('message', ''))} |")
            if line not in shown:  # a pack that does not load gives one row, not one per test
                shown.add(line)
                lines.append(line)
        lines.append("")
    if nodes:
        lines += ["Pack folders of the latest run: " + ", ".join(f"`{Path(n).name}`" for n in nodes), ""]
    return "\n".join(lines)


def write_matrix(results: Path, versions: list[str], today: str, nodes: list[str]) -> None:
    found = matrix_of_run(results, versions, today)
    if not found:
        return
    data = json.loads(JSON_PATH.read_text(encoding="utf-8")) if JSON_PATH.is_file() else {}
    matrix = {**data.get("matrix", {}), **found}
    data["matrix"] = {v: matrix[v] for v in sorted(matrix, key=version_key)}
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    MATRIX_DOC.write_text(matrix_doc(data["matrix"], nodes), encoding="utf-8")
    print(f"[compat] compatibility matrix of {', '.join(found)} written to {MATRIX_DOC}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--partial", type=int, default=0)
    parser.add_argument("--nodes", default="", help="the custom-node folders given to the run (os.pathsep-separated)")
    parser.add_argument("hosts", nargs="*")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    rows = [host_row(item, args.results, today) for item in args.hosts]
    for row in rows:
        print(summary_line(row))
        for reason in row["skip_reasons"]:
            print(f"[compat]   skipped {reason}")
    write_matrix(args.results, [r["comfyui"] for r in rows], today, [n for n in args.nodes.split(os.pathsep) if n])
    if args.partial:
        print("[compat] part of the suite only: the host rows of docs/compat.json and the docs/hosts.md table are left as "
              "they are")
        return 0
    data = json.loads(JSON_PATH.read_text(encoding="utf-8")) if JSON_PATH.is_file() else {}
    previous = data.get("hosts", [])
    ran = {r["comfyui"] for r in rows}
    hosts = sorted([r for r in previous if r["comfyui"] not in ran] + rows, key=lambda r: version_key(r["comfyui"]))
    for r in hosts:
        r.pop("folder", None)
        r.pop("junit_found", None)
    constraints = (REPO / "scripts" / "constraints.txt").read_text(encoding="utf-8")
    pins = [line for line in constraints.splitlines() if line and not line.startswith("#")]
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    data.update(pins=pins, hosts=hosts)
    JSON_PATH.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    lines = table(hosts)
    text = HOSTS_DOC.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        HOSTS_DOC.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail, encoding="utf-8")
    else:
        print(f"[compat] {HOSTS_DOC.name} has no {BEGIN} ... {END} markers: the table is printed only", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
