"""benchmarks/gpu/gpu_session.sh: every benchmark command of the current device modes parses with its script's own
argument parser, on both sides of a mode's GPU-check branch. A typo there costs a whole device call (issue 24's
device time is 30 minutes a session); here it costs a test run. `python3` and `nvidia-smi` are stubs that record the
commands (and, with FAKE_OK=1, print a passing check line); nothing runs on a GPU."""
import argparse
import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SESSION = os.path.join(ROOT, "benchmarks", "gpu", "gpu_session.sh")
MODES = ["i24cg", "i24run", "i24all", "i24merge", "i24mchk", "i24go", "i24chk", "i24prof2", "i24gaps",  # not yet run
         "i24tune", "i24next", "i24codes"]
RECORDER = """import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_OK") == "1":
    print("{'member': 'to_q', 'rel_vs_triton': 1e-5, 'ok': True}")
"""


def _stub(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _commands(tmp_path, mode, fake_ok):
    """The python3 command lines that `gpu_session.sh MODE` runs, each [script, *args]."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (tmp_path / "recorder.py").write_text(RECORDER)
    _stub(shim / "python3", f'#!/bin/bash\nexec "{sys.executable}" "{tmp_path / "recorder.py"}" "$@"\n')
    _stub(shim / "nvidia-smi", "#!/bin/bash\necho STUB GPU\n")
    record = tmp_path / f"{mode}_{fake_ok}.jsonl"
    env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), RECORD=str(record),
               FAKE_OK="1" if fake_ok else "0")
    r = subprocess.run(["bash", SESSION, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


class _Parsed(Exception):
    pass


_MODULES = {}


def _parse(argv, monkeypatch):
    """Parse argv[1:] with the `main` of the script argv[0] (relative to the repository), stopping right after."""
    script = os.path.join(ROOT, argv[0])
    if script not in _MODULES:
        for d in (os.path.join(ROOT, "benchmarks"), os.path.dirname(script)):
            if d not in sys.path:
                sys.path.insert(0, d)
        spec = importlib.util.spec_from_file_location("gpu_session_" + os.path.basename(script)[:-3], script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[script] = mod
    orig = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(orig(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        _MODULES[script].main(argv[1:])
    except _Parsed as e:
        return e.args[0]
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{argv[0]}'s main returned without parsing its arguments")


@pytest.mark.parametrize("mode", MODES)
def test_device_mode_commands_parse(mode, tmp_path, monkeypatch):
    seen = []
    for fake_ok in (False, True):
        for argv in _commands(tmp_path, mode, fake_ok):
            assert argv and argv[0].startswith("benchmarks/"), argv
            try:
                _parse(argv, monkeypatch)
            except SystemExit as e:                  # argparse's error: name the command
                raise AssertionError(f"{mode}: {' '.join(argv)} does not parse (exit {e.code})") from None
            seen.append(argv[0])
    assert seen, f"{mode} ran no benchmark command"


def test_a_bad_option_is_caught(monkeypatch):
    with pytest.raises(SystemExit):
        _parse(["benchmarks/step_latency.py", "--modes", "bf16", "--no-such-option"], monkeypatch)
    ns = _parse(["benchmarks/step_latency.py", "--modes", "bf16", "--codes-in-kernel", "64", "128"], monkeypatch)
    assert ns.codes_in_kernel == [64, 128]
