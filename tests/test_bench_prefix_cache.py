"""bench.prefix_cache: the cache-on/off comparison on chat traffic, on the tiny model."""

from __future__ import annotations

import json

from mlx_serving.bench.prefix_cache import main


def test_runs_cache_off_and_on_and_counts_the_shared_system_prompts_hits(tiny_model_path,
                                                                        tmp_path, capsys):
    out = tmp_path / "runs.json"
    assert main(["--model", str(tiny_model_path), "--system-words", "60", "--concurrency", "2",
                 "--requests-per-stream", "2", "--output-tokens", "4", "--input-tokens", "8",
                 "--repeats", "1", "--json", str(out)]) == 0
    off, on = json.loads(out.read_text())["runs"]
    assert (off["cache"], on["cache"]) == ("off", "on")
    assert off["hits"] == 0 and on["hits"] == 4   # every measured request reuses the prefix
    assert off["failed"] == on["failed"] == 0 and on["output_tok_s"] > 0
    assert "| 60 | on |" in capsys.readouterr().out
