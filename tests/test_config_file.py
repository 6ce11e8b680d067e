"""--config FILE: TOML / JSON / YAML option files, command-line precedence, a run's config.json
rerunning that run, and bad files as one line."""
import json
import subprocess
import sys

import pytest

from fsl_fast.train import main


def _rows(d):
    return [{k: v for k, v in json.loads(l).items() if not k.startswith("seconds_")}
            for l in (d / "metrics.jsonl").read_text().splitlines()]


def test_toml_then_command_line_then_rerun_from_config_json(tmp_path):
    f = tmp_path / "study.toml"
    f.write_text('algorithm = "cse_fsl"\nclients = 4\nrounds = 3\ndataset = "synthetic:1x12x12"\n'
                 'batch_size = 32\nlr = 0.002\n')
    a = tmp_path / "a"
    assert main(["--config", str(f), "--rounds", "2", "--no-progress", "--out", str(a)]) == 0
    cfg = json.loads((a / "config.json").read_text())
    # from the file, except --rounds (the command line wins); the rest are defaults
    assert (cfg["algorithm"], cfg["clients"], cfg["rounds"], cfg["lr"], cfg["seed"]) == ("cse_fsl", 4, 2, 0.002, 0)
    b = tmp_path / "b"
    assert main(["--config", str(a / "config.json"), "--no-progress", "--out", str(b)]) == 0
    assert json.loads((b / "config.json").read_text()) == cfg
    assert _rows(a) == _rows(b)


@pytest.mark.parametrize("name,text,needle", [
    ("x.toml", 'clients = 4\nclinets = 5\n', "unknown option 'clinets'"),
    ("x.toml", 'clients-per-round = 2\n', "did you mean clients_per_round?"),
    ("x.toml", 'clients = [1\n', "--config: cannot read"),
    ("x.toml", 'clients = "many"\n', "--clients: must be a positive integer"),
    ("x.json", '[1, 2]', "must hold a table"),
    ("x.json", '{"format_version": 99, "clients": 2}', "format"),
    ("x.ini", 'clients = 2\n', "expected a .toml, .json, .yaml or .yml file"),
])
def test_bad_files_exit_with_one_line(tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "fsl_fast.train", "--config", str(f), "--no-progress",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def test_yaml_when_available(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("clients: 3\nrounds: 1\ndataset: synthetic:1x12x12\nbatch_size: 32\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        assert main(["--config", str(f), "--no-progress", "--out", str(tmp_path / "r")]) == 2
        assert "needs PyYAML" in capsys.readouterr().err
        return
    assert main(["--config", str(f), "--no-progress", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["clients"] == 3


def test_config_with_resume_is_refused(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text("clients = 3\n")
    assert main(["--config", str(f), "--resume", str(tmp_path)]) == 2
    assert "not with --resume" in capsys.readouterr().err
