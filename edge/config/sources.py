"""Reading configuration files and collecting the problems found in them.

Shared by the agent-file loader (:mod:`edge.config.agent`) and the KubeEdge manifest
loader (:mod:`edge.config.kubeedge`): YAML documents with their file and 1-based
document index, manifest path expansion, and a :class:`Report` that gathers every
:class:`~edge.config.errors.Problem` (errors and warnings) before anything is applied.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ValidationError

from edge.config.errors import ConfigError, Problem

try:
    from yaml import CSafeLoader as _Loader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

MANIFEST_SUFFIXES = (".yaml", ".yml")
"""File name endings read when a manifest path is a directory."""
MAX_FILE_BYTES = 16 << 20
"""The largest configuration file read (agent file or manifest): 16 MiB."""
MESSAGE_ONLY = "message_only"
"""The type of a pydantic custom error (``PydanticCustomError``) whose message is
reported as it is, without the ``(got …)`` other errors get."""


def join_field(prefix: str, *parts: str | int) -> str:
    """Append keys and list indices to a field path: ``("spec", "properties", 2)``
    after ``""`` gives ``spec.properties[2]``."""
    path = prefix
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


@dataclass(frozen=True, slots=True)
class Where:
    """The file, 1-based document index and object a problem is reported against.

    ``prefix`` is prepended to every field path (e.g. ``items[3]`` for an object inside
    a ``kind: List`` document).
    """

    file: str
    document: int | None = None
    obj: str | None = None
    prefix: str = ""

    def field(self, *parts: str | int) -> str:
        """The full field path of ``parts`` inside this object."""
        return join_field(self.prefix, *parts)


@dataclass(frozen=True, slots=True)
class Document:
    """One parsed YAML document: ``data`` is whatever the document holds (None if empty)."""

    file: str
    index: int
    data: object


class Report:
    """Collects the problems of one load; an identical problem is kept once.

    Field paths given to :meth:`error`/:meth:`warning` are already full paths (use
    :meth:`Where.field`).
    """

    def __init__(self) -> None:
        self._problems: dict[Problem, None] = {}

    def add(
        self,
        where: Where,
        field: str,
        message: str,
        severity: Literal["error", "warning"] = "error",
    ) -> None:
        """Record one problem at ``field`` of ``where``."""
        problem = Problem(where.file, where.document, where.obj, field, message, severity)
        self._problems.setdefault(problem)

    def error(self, where: Where, field: str, message: str) -> None:
        """Record an error: the input will not be applied."""
        self.add(where, field, message, "error")

    def warning(self, where: Where, field: str, message: str) -> None:
        """Record a warning: the input is applied, but something is doubtful or ignored."""
        self.add(where, field, message, "warning")

    def validation_error(
        self,
        err: ValidationError,
        where: Where,
        field: str,
        *,
        model: type[BaseModel] | None = None,
    ) -> None:
        """Record every error of a pydantic validation of the value at ``field``.

        With ``model`` (the class validated), an unknown key's message lists the keys
        accepted at that place.
        """
        for item in err.errors(include_url=False):
            loc = item["loc"]
            if item["type"] == "missing":
                message = "is required"
            elif item["type"] == "extra_forbidden":
                accepted = _model_keys(model, loc[:-1]) if model else []
                message = f"unknown key {loc[-1]!r}"
                if accepted:
                    message += f"; accepted: {', '.join(accepted)}"
            elif item["type"] == MESSAGE_ONLY:
                message = item["msg"]
            elif item["type"] == "value_error":
                message = str(item.get("ctx", {}).get("error", item["msg"]))
                if not isinstance(item["input"], dict):  # a section-level check
                    message += f" (got {item['input']!r})"
            else:
                message = f"{item['msg']} (got {item['input']!r})"
            self.error(where, join_field(field, *loc), message)

    @property
    def problems(self) -> list[Problem]:
        """All problems, errors and warnings, grouped by file (in the order the files
        came up) and document, in the order found within one document."""
        files: dict[str, int] = {}
        for problem in self._problems:
            files.setdefault(problem.file, len(files))
        return sorted(self._problems, key=lambda p: (files[p.file], p.document or 0))

    @property
    def warnings(self) -> tuple[Problem, ...]:
        """The warnings only."""
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def has_errors(self) -> bool:
        """True when at least one error was recorded."""
        return any(p.severity == "error" for p in self._problems)

    def raise_if_errors(self) -> None:
        """Raise :class:`ConfigError` with every problem (warnings too) if any is an error."""
        if self.has_errors:
            raise ConfigError(self.problems)


def _model_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The keys accepted by the (nested) pydantic model at ``loc`` (through lists and
    optional values, by alias); [] if not a model."""
    current: type[BaseModel] = model
    for part in loc:
        if isinstance(part, int):  # an index into a list of models
            continue
        field = next((f for name, f in current.model_fields.items()
                      if (f.alias or name) == part), None)
        nested = _model_in(field.annotation) if field else None
        if nested is None:
            return []
        current = nested
    return [field.alias or name for name, field in current.model_fields.items()]


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The model an annotation holds: ``M``, ``list[M]``, ``M | None``; None if none."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in get_args(annotation) if (m := _model_in(arg)) is not None), None)


def _yaml_error_message(err: yaml.YAMLError) -> str:
    if not (isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None):
        return f"YAML syntax error: {err}"
    mark = err.problem_mark
    message = f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    if err.context:
        started = err.context_mark
        since = f" (line {started.line + 1})" if started and started.line != mark.line else ""
        message += f", {err.context}{since}"
    return message


def file_kind(mode: int) -> str:
    """What a file that is neither a regular file nor a directory is, from its
    ``st_mode``: ``a FIFO``, ``a character device``, …"""
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}  # fmt: skip
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


class _UnfitFileError(Exception):
    """A path that is not read: not a regular file, or too large."""


def _read_bytes(path: Path) -> bytes:
    """The content of the regular file ``path``, at most :data:`MAX_FILE_BYTES`; a FIFO,
    device or socket is rejected before anything is read (:class:`_UnfitFileError`)."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is rejected below.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _UnfitFileError("is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise _UnfitFileError(f"is not a regular file ({file_kind(mode)})")
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _UnfitFileError(
            f"is larger than {MAX_FILE_BYTES >> 20} MiB, the most edge reads from one file; "
            "split the manifests into several files"
        )
    return data


def _read_text(path: Path, report: Report) -> str | None:
    try:
        return _read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        message = "no such file"
    except _UnfitFileError as err:
        message = str(err)
    except (OSError, UnicodeDecodeError) as err:
        message = f"cannot read: {err}"
    report.error(Where(str(path)), "", message)
    return None


def read_yaml_file(path: Path, report: Report) -> tuple[bool, object]:
    """Read a single-document YAML file.

    Returns ``(True, data)`` (data is None for an empty file), or ``(False, None)``
    when the file is missing, unreadable or not valid YAML; that problem is reported.
    """
    text = _read_text(path, report)
    if text is None:
        return False, None
    try:
        return True, yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        report.error(Where(str(path)), "", _yaml_error_message(err))
        return False, None


def read_yaml_documents(path: Path, report: Report) -> list[Document]:
    """Read a multi-document YAML file; empty documents are skipped.

    On a syntax error the error names the file, the document and the line; the
    documents before it are still returned so that they can be checked too.
    """
    text = _read_text(path, report)
    if text is None:
        return []
    documents: list[Document] = []
    index = 0
    try:
        for index, data in enumerate(yaml.load_all(text, Loader=_Loader), start=1):
            if data is not None:
                documents.append(Document(str(path), index, data))
    except yaml.YAMLError as err:
        report.error(Where(str(path), index + 1), "", _yaml_error_message(err))
    return documents


def special_file(path: Path) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a directory
    (symbolic links followed), e.g. ``a FIFO``; None otherwise."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else file_kind(mode)


def _manifest_files(directory: Path, report: Report) -> list[Path]:
    files = []
    for path in directory.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(directory).parts)
        if hidden or path.suffix not in MANIFEST_SUFFIXES:
            continue
        if path.is_file():
            files.append(path)
        elif kind := special_file(path):
            report.warning(Where(str(path)), "", f"is not a regular file ({kind}); skipped")
    return sorted(files)


def expand_manifest_paths(paths: Iterable[Path], report: Report) -> list[Path]:
    """Files to read for ``paths``: a file as is, a directory as its ``*.yaml``/``*.yml``
    files (recursive, sorted, hidden names such as a ConfigMap mount's ``..data``
    skipped; a FIFO, device or socket among them skipped with a warning). A path listed
    twice is read once; a missing path, or one that is neither a regular file nor a
    directory, is an error."""
    seen: set[Path] = set()
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = _manifest_files(path, report)
            if not found:
                report.warning(Where(str(path)), "", "directory holds no *.yaml or *.yml files")
        elif path.is_file():
            found = [path]
        else:
            kind = special_file(path)
            problem = f"is not a regular file or directory ({kind})" if kind else ""
            report.error(Where(str(path)), "", problem or "no such file or directory")
            continue
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files


def or_list(values: Sequence[str]) -> str:
    """``a, b or c`` for messages that list what is accepted."""
    if len(values) < 2:
        return "".join(values)
    return f"{', '.join(values[:-1])} or {values[-1]}"
