"""Everyday CLI mistakes end in one line on stderr naming the file, port or flag, and a non-zero exit."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from featurebank.client.cli import build_parser
from support import TESTS_DIR, ServerProcess, free_port, random_images

CLI = [sys.executable, "-m", "featurebank.client.cli"]


def _env(**extra: str) -> dict[str, str]:
    # What a user's shell has: no TF log-level override (the CLI must be quiet on its own).
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
    return {**env, **extra}


def _run(*args: str, cwd: pathlib.Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def files(tmp_path):
    """Two class folders of images, a loose image, a text file and a file that is not an image."""
    images = random_images(6, seed=3)
    for i, data in enumerate(images):
        folder = tmp_path / "photos" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(data)
    (tmp_path / "cat.png").write_bytes(images[0])
    (tmp_path / "reviews.txt").write_text("great film\nawful plot\n")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_missing_file_is_one_usage_line(files):
    """A file that does not exist: exit 2, one line naming it."""
    r = _run("extract", "missing.jpg", "--out", "f.npy", cwd=files)
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "missing.jpg" in line and "no such file" in line


def test_binary_file_with_text_flag_is_one_usage_line(files):
    """--text on an image: exit 2, one line naming the file and saying to drop --text."""
    r = _run("extract", "cat.png", "--text", "--out", "f.npy", cwd=files)
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "cat.png" in line and "UTF-8" in line and "--text" in line


def test_folder_with_text_flag_and_empty_folder_say_how(files):
    """A folder with --text, or a folder with no images: exit 2, one line naming it and what to pass instead."""
    r = _run("extract", "photos", "--text", "--out", "f.npy", cwd=files)
    assert r.returncode == 2
    assert "photos" in _one_line(r.stderr) and "folder" in r.stderr
    r = _run("extract", "empty", "--out", "f.npy", cwd=files)
    assert r.returncode == 2
    assert "empty" in _one_line(r.stderr) and ".png" in r.stderr


def test_usage_errors_are_one_line_with_exit_2(files):
    """argparse's own errors (a missing --out) are one line naming the flag, exit 2."""
    r = _run("extract", "cat.png", cwd=files)
    assert r.returncode == 2
    assert "--out" in _one_line(r.stderr)


def test_unreachable_server_is_one_line_naming_target(files):
    """No server at the target: exit 1, one line naming the address and --target."""
    target = f"127.0.0.1:{free_port()}"
    r = _run("extract", "cat.png", "--out", "f.npy", "--target", target, "--quiet", cwd=files)
    assert r.returncode == 1
    line = _one_line(r.stderr)
    assert target in line and "--target" in line and "featurebank serve" in line


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_busy_port_is_one_line_naming_port_and_flag(files, flag):
    """`featurebank serve` on a port in use: non-zero exit, one line naming the port and the flag."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": "0", flag: str(port)}
        r = _run(
            "serve",
            "--backbone",
            "toy",
            "--host",
            "127.0.0.1",
            "--port",
            ports["--port"],
            "--metrics-port",
            ports["--metrics-port"],
            cwd=files,
            timeout=120,
        )
    assert r.returncode not in (0, None)
    line = _one_line(r.stderr)
    assert str(port) in line and flag in line and "in use" in line


def test_version_and_help_explain_every_option():
    """--version prints the version; every option of every command has a help text."""
    r = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 0 and r.stdout.startswith("featurebank 0.")
    parser = build_parser()
    unexplained = []
    for command, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if not action.help:
                unexplained.append(f"{command} {'/'.join(action.option_strings) or action.dest}")
    assert unexplained == []


def test_folders_expand_and_skip_errors_writes_good_rows_and_a_report(server, files):
    """A folder expands to its images; --skip-errors writes the good rows and a report of the bad inputs."""
    r = _run(
        "extract",
        "photos",
        "junk.png",
        "cat.png",
        "--backbone",
        "toy",
        "--out",
        "f.npy",
        "--quiet",
        "--target",
        server.target,
        cwd=files,
    )
    assert r.returncode == 1 and "junk.png" in r.stderr and "--skip-errors" in r.stderr
    assert not (files / "f.npy").exists()
    r = _run(
        "extract",
        "photos",
        "junk.png",
        "cat.png",
        "--backbone",
        "toy",
        "--out",
        "f.npy",
        "--quiet",
        "--skip-errors",
        "--target",
        server.target,
        cwd=files,
    )
    assert r.returncode == 0, r.stderr
    features = np.load(files / "f.npy")
    assert features.shape == (7, 16)  # 6 images in the folder, and cat.png
    report = (files / "f.errors.tsv").read_text().splitlines()
    assert report[0] == "index\tinput\tcode\tmessage"
    assert len(report) == 2 and report[1].startswith("6\tjunk.png\tINVALID_ARGUMENT\t")
    assert "f.errors.tsv" in r.stderr


def test_text_file_sent_as_images_hints_at_text_flag(server, files):
    """A text file without --text fails as an image with a hint to add --text."""
    r = _run(
        "extract", "reviews.txt", "--backbone", "toy", "--out", "f.npy", "--quiet", "--target", server.target, cwd=files
    )
    assert r.returncode == 1
    assert "reviews.txt" in r.stderr and "--text" in r.stderr and "Traceback" not in r.stderr


def test_train_and_put_head_are_quiet_and_say_metrics_are_training_metrics(server, files):
    """train-head on a few images prints no TensorFlow/CUDA lines and says its metrics are training metrics."""
    r = _run(
        "train-head", "photos", "--backbone", "toy", "--out", "h.keras", "--quiet", "--target", server.target, cwd=files
    )
    assert r.returncode == 0, r.stderr
    noise = [line for line in r.stderr.splitlines() if any(w in line for w in ("cuda", "cuInit", "absl", "oneDNN"))]
    assert noise == []
    assert "training metrics" in r.stdout + r.stderr and "validation skipped" in r.stdout + r.stderr
    r = _run("put-head", "h.keras", "--name", "quiet-head", "--target", server.target, cwd=files)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_server_says_stopped_after_the_drain():
    """SIGTERM: the server's main process logs one last 'stopped' line after draining, and exits 0."""
    s = ServerProcess("--backbone", "toy").start()
    assert s.terminate() == 0
    last = s.log().strip().splitlines()[-1]
    assert "stopped" in last and "featurebank.server" in last
