"""The reference host exports its metrics (issue 17): ``demo --metrics`` across workers."""

from __future__ import annotations

import json

import pytest

from knhk_memory.cli import main

prom_parser = pytest.importorskip("prometheus_client.parser")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_demo_metrics_prints_a_scrape_that_agrees_with_the_run(isolated, capsys, workers):
    code = main(["demo", "--no-budgets", "--no-progress", "--json", "--metrics", "--cases", "1500", "--workers",
                 workers, "--store", str(isolated / "s.knhk"), "--build"])
    out = capsys.readouterr().out
    summary, scrape = out.split("\n# HELP", 1)
    result = json.loads(summary)
    assert code == 0 and result["ok"], result["checks"]
    names = [c["check"] for c in result["checks"]]
    assert "labelled cases-completed counters add up to the cases run" in names
    assert "per-pattern latency histograms count every pattern execution" in names
    fams = {f.name: f for f in prom_parser.text_string_to_metric_families("# HELP" + scrape)}
    done = [s.value for s in fams["knhk_refhost_cases_completed"].samples]
    assert sum(done) == 1500 and len(done) == int(workers)
    execs = {s.labels["pattern"]: s.value for s in fams["knhk_pattern_executions"].samples}
    counts = {s.labels["pattern"]: s.value for s in fams["knhk_pattern_execution_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == execs and len(counts) == 11
    assert fams["knhk_cases_started"].samples[0].value == 1500
    assert "knhk_allocator_live_bytes" in fams and "knhk_arena_high_water" in fams
    if workers == "1":
        assert fams["knhk_arena_resets"].samples[0].value > 0


def test_demo_metrics_serve_bad_port(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--metrics-serve", "-1"])
    assert "--metrics-serve must be a port in 0..65535 (0: any free port), got -1" in capsys.readouterr().err


def test_demo_metrics_serve_scrape_once_and_stop(isolated):
    import os
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "KNHK_MEMORY_REEXECED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "knhk_memory", "demo", "--no-budgets", "--no-progress",
                             "--cases", "500", "--store", str(isolated / "s.knhk"), "--build", "--metrics-serve", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving metrics on "):
                break
        assert lines and lines[-1].startswith("serving metrics on http://127.0.0.1:"), "".join(lines)
        assert any("knhk-memory demo: 500 cases" in ln for ln in lines)  # the summary came first
        with urllib.request.urlopen(lines[-1].split()[3], timeout=20) as r:
            fams = {f.name: f for f in prom_parser.text_string_to_metric_families(r.read().decode())}
        assert fams["knhk_cases_completed"].samples[0].value == 500
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_demo_metrics_with_a_cluster_is_refused(isolated, capsys):
    assert main(["demo", "--no-budgets", "--metrics", "--cluster", "local:1"]) == 2
    err = capsys.readouterr().err
    assert ("--metrics records into a shared-memory block the workers of this machine attach to; the --cluster "
            "local:1 workers may run elsewhere: use --workers N with --metrics") in err
