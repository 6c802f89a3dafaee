"""The embedded default end to end: `python recipes/r1_zero.py` with no arguments must measurably learn."""
import json

from recipes.r1_zero import main


def test_embedded_default_learns(tmp_path):
    out = tmp_path / "run"
    before, after = main(["--out", str(out), "--train.no-export-hf"])
    # the base model slips on carries and drops tags; GRPO with the rule rewards must fix both
    assert after["eval/pass@1"] >= before["eval/pass@1"] + 0.15, (before, after)
    assert after["eval/format_rate"] >= 0.9, after
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "reward/mean" in x]
    assert len(steps) == 60
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "latest").is_file()
