"""Shared by the recipe tests."""


def one_error_line(capsys, main, argv) -> str:
    """Run a recipe's main through run_cli; it must exit 2 with exactly one 'error: ...' line and no traceback."""
    from r1_engine.engine.config import run_cli

    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
