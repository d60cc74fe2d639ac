"""`callcenter` verbs that need no servers: persona checks and argument errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_personas_check_lists_every_persona(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["personas", "check", "--dir", str(ROOT / "personas")]) == 0
    out = capsys.readouterr().out
    for persona_id in ("general-assistant", "restaurant-orders", "waste-management"):
        assert persona_id in out
    assert "3 personas OK" in out
    assert "+15550100001" in out  # the dialled number routed to waste-management


def _broken_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "personas"
    shutil.copytree(ROOT / "personas", directory)
    path = directory / "waste-management.yaml"
    path.write_text(path.read_text().replace("max_call_seconds: 600", "max_call_seconds: 2"))
    return directory


def test_personas_check_names_file_and_field_of_a_broken_persona(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = _broken_dir(tmp_path)
    assert main(["personas", "check", "--dir", str(directory)]) != 0
    message = caplog.text
    assert "waste-management.yaml" in message and "max_call_seconds" in message


def test_personas_check_through_the_installed_command(tmp_path: Path) -> None:
    directory = _broken_dir(tmp_path)
    broken = subprocess.run(
        [sys.executable, "-m", "app.cli", "personas", "check", "--dir", str(directory)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert broken.returncode != 0
    assert "waste-management.yaml" in broken.stderr and "max_call_seconds" in broken.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "app.cli", "personas", "check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert "3 personas OK" in ok.stdout


def test_call_rejects_bad_arguments_before_dialling(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["call", "--audio", str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav" in caplog.text
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"")
    assert main(["call", "--audio", str(wav), "--dtmf", "12x"]) == 2
    assert "DTMF" in caplog.text


def test_unknown_verb_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dance"])
    assert exc.value.code == 2


# An interpreter where torch (the worker extra) cannot be imported, like the gateway image.
_WITHOUT_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
from app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verb", ["worker", "up", "bench"])
def test_model_verbs_without_the_worker_extra_say_what_to_install(verb: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, verb], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "needs the 'worker' extra (missing: torch)" in done.stderr and "callcenter[worker]" in done.stderr


def test_the_gateway_and_the_simulated_caller_need_no_torch(tmp_path: Path) -> None:
    probe = _WITHOUT_TORCH.replace(
        "from app.cli import main\nsys.exit(main(sys.argv[1:]))",
        "import app.gateway.app, app.sim.call, app.cli\nassert 'torch' not in sys.modules",
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
