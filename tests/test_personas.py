"""Persona files: validation with errors naming file and field, routing by dialled number."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.personas import BUNDLED_VOICES, PersonaError, load_personas

GOOD = """\
id: {id}
name: Test line
prompt: You answer the test line.
voice: {voice}
numbers: {numbers}
default: {default}
"""


def _write(directory: Path, name: str, *, id: str, voice: str = "NATF0", numbers: str = "[]", default: str = "false") -> Path:
    path = directory / name
    path.write_text(GOOD.format(id=id, voice=voice, numbers=numbers, default=default))
    return path


def test_shipped_personas_load_and_route() -> None:
    book = load_personas(Path(__file__).resolve().parents[1] / "personas")
    assert len(book.personas) >= 3
    assert book.default_id == "general-assistant"
    assert book.for_number("+15550100001").id == "waste-management"
    assert book.for_number("+15550100003").id == "restaurant-orders"
    assert book.for_number("+19999999999").id == "general-assistant"
    assert book.for_number(None).id == "general-assistant"
    for persona in book.personas.values():
        assert persona.voice in BUNDLED_VOICES
        assert persona.prompt and persona.max_call_seconds > 0


def test_bad_field_error_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("id: broken\nname: X\nprompt: Hi\nvoice: NATF0\nsampling:\n  text_top_k: -3\n")
    with pytest.raises(PersonaError) as err:
        load_personas(tmp_path)
    assert str(path) in str(err.value) and "sampling.text_top_k" in str(err.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("id: Bad Id\nname: X\nprompt: Hi\nvoice: NATF0\n", "id"),
        ("id: a\nname: X\nprompt: Hi\nvoice: NOPE9\n", "voice"),
        ("id: a\nname: X\nprompt: Hi\nvoice: ../secret.wav\n", "voice"),
        ("id: a\nname: X\nprompt: Hi\nvoice: /etc/x.wav\n", "voice"),
        ("id: a\nname: X\nprompt: Hi\nvoice: NATF0\nnumbers: ['555']\n", "numbers"),
        ("id: a\nname: X\nvoice: NATF0\n", "prompt"),
        ("id: a\nname: X\nprompt: Hi\nvoice: NATF0\ncolour: blue\n", "colour"),
        ("id: a\nname: X\nprompt: Hi\nvoice: NATF0\ntransfer_number: nope\n", "transfer_number"),
    ],
)
def test_each_invalid_field_is_named(tmp_path: Path, text: str, field: str) -> None:
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(PersonaError, match=rf"p\.yaml: field '{field}'"):
        load_personas(tmp_path)


def test_not_yaml_or_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("id: [unclosed\n")
    with pytest.raises(PersonaError, match="not valid YAML"):
        load_personas(tmp_path)
    (tmp_path / "p.yaml").write_text("- a list\n")
    with pytest.raises(PersonaError, match="expected a mapping"):
        load_personas(tmp_path)


def test_duplicates_and_defaults_across_files(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", id="a", numbers="['+15550100001']", default="true")
    second = _write(tmp_path, "b.yaml", id="b", numbers="['+15550100001']")
    with pytest.raises(PersonaError, match=rf"{second.name}: field 'numbers'.*routes to persona 'a'"):
        load_personas(tmp_path)
    _write(tmp_path, "b.yaml", id="a")
    with pytest.raises(PersonaError, match="b.yaml: field 'id'"):
        load_personas(tmp_path)
    _write(tmp_path, "b.yaml", id="b", default="true")
    with pytest.raises(PersonaError, match="b.yaml: field 'default'"):
        load_personas(tmp_path)


def test_voice_files_are_checked_against_the_voices_dir(tmp_path: Path) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    voices = tmp_path / "voices"
    (voices / "custom").mkdir(parents=True)
    _write(personas, "a.yaml", id="a", voice="NATF0")
    _write(personas, "b.yaml", id="b", voice="custom/me.wav")
    book = load_personas(personas)
    with pytest.raises(PersonaError, match="a.yaml: field 'voice'"):
        book.check_voices(voices)
    (voices / "NATF0.pt").write_bytes(b"x")
    (voices / "custom" / "me.wav").write_bytes(b"x")
    book.check_voices(voices)
    assert book.get("b").voice_path(voices) == (voices / "custom" / "me.wav").resolve()


def test_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PersonaError, match="no persona files"):
        load_personas(tmp_path)
    with pytest.raises(PersonaError, match="does not exist"):
        load_personas(tmp_path / "missing")
