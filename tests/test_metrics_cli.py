"""``knhk-memory metrics``: one scrape printed, or served on loopback (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from knhk_memory import Counters
from knhk_memory.cli import main
from knhk_memory.metrics import Metrics

prom_parser = pytest.importorskip("prometheus_client.parser")
om_parser = pytest.importorskip("prometheus_client.openmetrics.parser")


@pytest.fixture
def engine_blocks(tmp_path):
    m = Metrics(shared=str(tmp_path / "m.block"))
    m.counter("tasks_completed", "Tasks.", labels=("task_type",)).labels("UserTask").add(4)
    m.histogram("lat_seconds", "Latency.", buckets=(0.1, 1)).observe(0.5)
    c = Counters(["cases_started", "errors"], shared=str(tmp_path / "c.block"))
    c.add("cases_started", 9)
    config = tmp_path / "knhk.toml"
    config.write_text(f'[metrics]\nshared_name = "{tmp_path / "m.block"}"\n'
                      f'[counters]\nnames = ["cases_started", "errors"]\nshared_name = "{tmp_path / "c.block"}"\n')
    yield config
    m.close()
    c.close()


def _values(text: str, parser) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in parser.text_string_to_metric_families(text) for s in f.samples}


def test_print_once(engine_blocks, capsys):
    assert main(["metrics", "--config", str(engine_blocks)]) == 0
    got = _values(capsys.readouterr().out, prom_parser)
    assert got[("tasks_completed_total", (("task_type", "UserTask"),))] == 4
    assert got[("lat_seconds_count", ())] == 1
    assert got[("knhk_cases_started_total", ())] == 9
    assert main(["metrics", "--openmetrics", "--config", str(engine_blocks)]) == 0
    text = capsys.readouterr().out
    assert text.endswith("# EOF\n") and _values(text, om_parser)[("lat_seconds_sum", ())] == 0.5


def test_serve_on_an_ephemeral_port_scrape_once_and_stop(engine_blocks):
    env = {**os.environ, "KNHK_MEMORY_REEXECED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "knhk_memory", "metrics", "--config", str(engine_blocks),
                             "--serve", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving metrics on http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split()[3]
        with urllib.request.urlopen(url, timeout=10) as r:
            got = _values(r.read().decode(), prom_parser)
        assert got[("tasks_completed_total", (("task_type", "UserTask"),))] == 4
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_errors(tmp_path, capsys):
    config = tmp_path / "knhk.toml"
    config.write_text("[metrics]\nmax_label_sets = 10\n")
    assert main(["metrics", "--config", str(config)]) == 2
    assert "metrics.shared_name" in capsys.readouterr().err
    config.write_text(f'[metrics]\nshared_name = "{tmp_path / "missing.block"}"\n')
    assert main(["metrics", "--config", str(config)]) == 2
    assert "no metrics block to attach to: file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["metrics", "--serve", "70000"])
    assert exc.value.code == 2
    assert "--serve must be a port in 0..65535 (0: any free port), got 70000" in capsys.readouterr().err
