"""benchmarks/run_gpu.sh's install, dry run: a carried wheel that only the `--target` fallback can install must be
visible to the stages after the `{ ... } | tee` group (whose subshell used to swallow the PYTHONPATH export)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _write_wheel(folder: Path) -> Path:
    """A pure-Python wheel written by hand (no build backend, no network): r1_probe 0.1."""
    wheel = folder / "r1_probe-0.1-py3-none-any.whl"
    files = {
        "r1_probe/__init__.py": "VALUE = 7\n",
        "r1_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: r1_probe\nVersion: 0.1\n",
        "r1_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "r1_probe-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("r1_probe-0.1.dist-info/RECORD", record)
    return wheel


def _read_only_image_python(folder: Path) -> Path:
    """A python that refuses `pip install` into its own site-packages, as a read-only image does, so the script must
    take its `--target` fallback; everything else goes to this interpreter."""
    shim = folder / "python"
    shim.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pip" ] && [[ " $* " != *" --target "* ]]; then\n'
        '  echo "read-only image (test shim)" >&2; exit 1\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    shim.chmod(0o755)
    return shim


def test_fallback_install_reaches_later_stages(tmp_path):
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    _write_wheel(wheels)
    (site / "stale").mkdir(parents=True)  # left by an earlier call: removed before the install
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": str(_read_only_image_python(tmp_path)),
        "R1_WHEELS": str(wheels),
        "R1_SITE": str(site),
    }
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", "setup"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "setup.log").read_text()
    assert "pip install into the image failed; trying --target" in log  # the fallback branch was taken
    assert (site / "r1_probe" / "__init__.py").is_file() and not (site / "stale").exists()
    # the repo's own editable install was refused too: its folders are linked as the r1_engine namespace
    assert "linking the folders as r1_engine.*" in log
    for folder in ("engine", "kernels", "parallel", "recipes", "native"):
        assert (site / "r1_engine" / folder).resolve() == REPO / folder
    # printed after the tee group, by the same shell the later stages run in
    assert f"carried wheels from {site} on PYTHONPATH" in log
    assert "r1_probe 0.1" in log.splitlines()
    assert "megatron-core 0.16.1" in log.splitlines()
    # the test's interpreter itself was left alone
    probe = subprocess.run([sys.executable, "-c", "import r1_probe"], capture_output=True, cwd=tmp_path, check=False)
    assert probe.returncode != 0


def test_unknown_stage_is_one_line(tmp_path):
    # the install still runs first: the shim keeps it from installing the repo into this interpreter
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": str(_read_only_image_python(tmp_path)),
           "R1_WHEELS": str(tmp_path / "none"), "R1_SITE": str(tmp_path / "site")}
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", "nope"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "unknown stage 'nope': use 'all' (default), 'kernels', 'kernel-tests', 'step' or 'setup'"
