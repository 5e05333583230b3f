"""scripts/compat_summary.py: the host matrix's junit parsing, summary lines, JSON and the host table of docs/hosts.md."""

from __future__ import annotations

import json

import compat_summary as cs  # scripts/ is on sys.path (conftest)
import pytest

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5">
 <testcase classname="tests.test_a" name="test_ok" time="0.1"/>
 <testcase classname="tests.test_a" name="test_ok_too" time="0.1"><system-out>log</system-out></testcase>
 <testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="assert 2 == 4">x</failure></testcase>
 <testcase classname="tests.test_b" name="test_teardown" time="0.1"><error message="teardown">y</error></testcase>
 <testcase classname="tests.test_b" name="test_kv[x]" time="0"><skipped type="pytest.skip"
   message="core FluxKVCache needs ComfyUI 0.30+">z</skipped></testcase>
</testsuite></testsuites>
"""


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "0.10.0.xml").write_text(JUNIT, encoding="utf-8")
    return folder


def test_junit_counts_one_outcome_per_test(results):
    c = cs.junit_counts(results / "0.10.0.xml")
    assert (c["found"], c["passed"], c["failed"], c["errors"], c["skipped"]) == (True, 2, 1, 1, 1)
    assert c["skip_reasons"] == ["tests.test_b::test_kv[x]: core FluxKVCache needs ComfyUI 0.30+"]
    assert cs.junit_counts(results / "missing.xml")["found"] is False


def test_summary_lines_and_partial_runs_write_nothing(results, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cs, "JSON_PATH", tmp_path / "compat.json")
    monkeypatch.setattr(cs, "HOSTS_DOC", tmp_path / "hosts.md")
    assert cs.main(["--results", str(results), "--partial", "1", "0.10.0|/h/0.10|1|42|0|7", "0.30.0|/h/0.30|0|40|3|9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("[compat] ComfyUI 0.10.0 (released 2026-01): 2 passed, 1 failed, 1 errors, 1 skipped in 42 s "
                        "(pytest exit 1); demo ok (exit 0, 7 s) -> FAIL")
    assert lines[1].startswith("[compat]   skipped tests.test_b::test_kv[x]: core FluxKVCache")
    assert "0.30.0" in lines[2] and "no test results" in lines[2] and "demo FAILED (exit 3, 9 s) -> FAIL" in lines[2]
    assert not (tmp_path / "compat.json").exists()


def test_full_run_writes_json_and_the_readme_table(results, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cs, "JSON_PATH", tmp_path / "docs" / "compat.json")
    monkeypatch.setattr(cs, "HOSTS_DOC", tmp_path / "hosts.md")
    (tmp_path / "docs").mkdir()
    old = {"comfyui": "0.3.75", "released": "2025-11", "checked": "2026-01-01", "passed": 9, "failed": 0, "errors": 0,
           "skipped": 0, "skip_reasons": [], "tests_exit": 0, "tests_s": 5, "demo_ok": True, "demo_s": 3}
    stale = dict(old, comfyui="0.10.0", passed=1)
    cs.JSON_PATH.write_text(json.dumps({"hosts": [stale, old]}), encoding="utf-8")
    cs.HOSTS_DOC.write_text(f"intro\n{cs.BEGIN}\nold table\n{cs.END}\nrest\n", encoding="utf-8")
    assert cs.main(["--results", str(results), "0.10.0|/h/0.10|1|42|0|7"]) == 0
    hosts = json.loads(cs.JSON_PATH.read_text(encoding="utf-8"))["hosts"]
    assert [h["comfyui"] for h in hosts] == ["0.3.75", "0.10.0"]  # sorted by version; the earlier 0.10.0 row replaced
    assert hosts[0] == old and hosts[1]["passed"] == 2 and "folder" not in hosts[1]
    readme = cs.HOSTS_DOC.read_text(encoding="utf-8")
    assert "old table" not in readme and readme.startswith("intro\n") and readme.endswith(f"{cs.END}\nrest\n")
    assert "| 0.3.75 | 2025-11 | 2026-01-01 | 9 passed, 0 failed, 0 errors, 0 skipped | ok |" in readme
    assert "| 0.10.0 | 2026-01 |" in readme and "| 2 passed, 1 failed, 1 errors, 1 skipped | ok |" in readme


def test_the_matrix_rows_become_docs_compatibility_md_even_after_a_partial_run(results, tmp_path, monkeypatch):
    monkeypatch.setattr(cs, "JSON_PATH", tmp_path / "compat.json")
    monkeypatch.setattr(cs, "MATRIX_DOC", tmp_path / "compatibility.md")
    monkeypatch.setattr(cs, "HOSTS_DOC", tmp_path / "hosts.md")
    base = {"pack": "TeaCache (x@1)", "family": "FLUX.1 Kontext", "order": "pack -> Apply"}
    rows = [dict(base, mode="cache=first_step", result="refused", message="SparseContext: no | pipes", outcome="passed"),
            dict(base, mode="cache=off", result="composes", message="oracle 1e-6", outcome="failed"),
            dict(base, mode="rule=attention", result="not run", message="Skipped: not given", outcome="skipped")]
    (results / "0.10.0.matrix.json").write_text(json.dumps({"comfyui": "0.10.0", "rows": rows}), encoding="utf-8")
    cs.JSON_PATH.write_text(json.dumps({"matrix": {"0.3.75": {"checked": "2026-01-01", "rows": []}}}), encoding="utf-8")
    assert cs.main(["--results", str(results), "--partial", "1", "--nodes", "/p/TeaCache", "0.10.0|/h|0|1|0|1"]) == 0
    assert set(json.loads(cs.JSON_PATH.read_text(encoding="utf-8"))["matrix"]) == {"0.3.75", "0.10.0"}
    doc = cs.MATRIX_DOC.read_text(encoding="utf-8")
    assert "## ComfyUI 0.10.0" in doc and "## ComfyUI 0.3.75 (checked 2026-01-01)" in doc
    assert "| cache=first_step | refused | SparseContext: no \\| pipes |" in doc
    assert "| cache=off | FAILED (test failed: see the log) |" in doc  # never the intended result of a failed test
    assert "| rule=attention | not run |" in doc and "`TeaCache`" in doc
