"""Personas: which role prompt and voice answer a line, read from `personas/*.yaml`.

    id: waste-management            # [a-z0-9-], unique
    name: City Waste Management
    prompt: You answer the city's waste management line ...
    voice: NATF2                    # a bundled voice, or a .wav path inside the voices directory
    sampling: {text_temperature: 0.7, text_top_k: 25, audio_temperature: 0.8, audio_top_k: 250}
    numbers: ["+15550100001"]       # dialled numbers routed here (E.164)
    max_call_seconds: 600
    transfer_number: "+15550100099" # optional
    default: true                   # exactly one persona answers numbers nobody claims

Every error names the file and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.protocol import MAX_TOP_K

BUNDLED_VOICES = frozenset(
    [f"NAT{g}{i}" for g in "FM" for i in range(4)] + [f"VAR{g}{i}" for g in "FM" for i in range(5)]
)
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


class PersonaError(ValueError):
    """A persona file that cannot be used; the message names the file and the field."""


class PersonaSampling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text_temperature: float = Field(default=0.7, ge=0, le=5)
    text_top_k: int = Field(default=25, ge=0, le=MAX_TOP_K)
    audio_temperature: float = Field(default=0.8, ge=0, le=5)
    audio_top_k: int = Field(default=250, ge=0, le=MAX_TOP_K)


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    name: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1, max_length=8000)
    voice: str
    sampling: PersonaSampling = PersonaSampling()
    numbers: tuple[str, ...] = ()
    max_call_seconds: int = Field(default=600, ge=10, le=4 * 3600)
    transfer_number: str | None = None
    default: bool = False

    @field_validator("voice")
    @classmethod
    def _voice(cls, value: str) -> str:
        if value in BUNDLED_VOICES:
            return value
        path = PurePosixPath(value)
        if path.suffix != ".wav":
            raise ValueError(
                f"{value!r} is neither a bundled voice ({', '.join(sorted(BUNDLED_VOICES))}) nor a .wav file"
            )
        if path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError(f"{value!r} must be a path inside the voices directory")
        return value

    @field_validator("numbers")
    @classmethod
    def _numbers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for number in value:
            if not _E164.match(number):
                raise ValueError(f"{number!r} is not an E.164 number like +15550100001")
        if len(set(value)) != len(value):
            raise ValueError("a number is listed twice")
        return value

    @field_validator("transfer_number")
    @classmethod
    def _transfer(cls, value: str | None) -> str | None:
        if value is not None and not _E164.match(value):
            raise ValueError(f"{value!r} is not an E.164 number like +15550100099")
        return value

    def voice_path(self, voices_dir: Path) -> Path:
        """The voice file: `<name>.pt` (or `.wav`) for a bundled voice, else the wav inside voices_dir."""
        if self.voice in BUNDLED_VOICES:
            for suffix in (".pt", ".wav"):
                candidate = voices_dir / f"{self.voice}{suffix}"
                if candidate.is_file():
                    return candidate
            return voices_dir / f"{self.voice}.pt"
        root = voices_dir.resolve()
        path = (voices_dir / self.voice).resolve()
        if not path.is_relative_to(root):
            raise PersonaError(f"persona {self.id}: field 'voice': {self.voice!r} leaves the voices directory")
        return path


@dataclass(frozen=True)
class PersonaBook:
    """All personas, the routing of dialled numbers, and the default."""

    personas: dict[str, Persona]
    sources: dict[str, Path]
    default_id: str

    def get(self, persona_id: str) -> Persona | None:
        return self.personas.get(persona_id)

    def for_number(self, dialled: str | None) -> Persona:
        """The persona answering `dialled`, or the default one."""
        if dialled:
            for persona in self.personas.values():
                if dialled in persona.numbers:
                    return persona
        return self.personas[self.default_id]

    def check_voices(self, voices_dir: Path) -> None:
        """Every persona's voice file exists in `voices_dir` (the worker checks this at start)."""
        for persona in self.personas.values():
            path = persona.voice_path(voices_dir)
            if not path.is_file():
                raise PersonaError(
                    f"{self.sources[persona.id]}: field 'voice': {persona.voice!r} not found in {voices_dir}"
                )


def load_persona(path: Path) -> Persona:
    """Read and validate one persona file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PersonaError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise PersonaError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PersonaError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return Persona.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(persona)"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise PersonaError(f"{path}: field '{field}': {first['msg']}{more}") from exc


def load_personas(directory: Path) -> PersonaBook:
    """Load every `*.yaml`/`*.yml` in `directory`; ids and numbers unique, exactly one default."""
    if not directory.is_dir():
        raise PersonaError(f"{directory}: personas directory does not exist")
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    if not files:
        raise PersonaError(f"{directory}: no persona files (*.yaml)")
    personas: dict[str, Persona] = {}
    sources: dict[str, Path] = {}
    owners: dict[str, str] = {}
    for path in files:
        persona = load_persona(path)
        if persona.id in personas:
            raise PersonaError(f"{path}: field 'id': {persona.id!r} is already used by {sources[persona.id]}")
        for number in persona.numbers:
            if number in owners:
                raise PersonaError(
                    f"{path}: field 'numbers': {number} already routes to persona {owners[number]!r}"
                )
            owners[number] = persona.id
        personas[persona.id] = persona
        sources[persona.id] = path
    defaults = [pid for pid, p in personas.items() if p.default]
    if len(defaults) > 1:
        raise PersonaError(
            f"{sources[defaults[1]]}: field 'default': only one persona may be the default "
            f"(also {sources[defaults[0]]})"
        )
    default_id = defaults[0] if defaults else next(iter(personas))
    return PersonaBook(personas=personas, sources=sources, default_id=default_id)
