"""Where rows come from: a ``data.source`` value (a file, a glob, a list, a ``save_to_disk`` folder, a
folder of split files, ``hf:<id>``) resolved to the files and folders :mod:`lit_lora.data.readers`
reads (the forms are listed in :mod:`lit_lora.data.rows`)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from lit_lora.data.rows import EXTENSIONS
from lit_lora.errors import UserError


# ------------------------------------------------------------------------------------------ sources
def is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def split_files(folder: Path) -> dict[str, list[Path]]:
    """``train`` / ``val`` / ``test`` files of a split folder (``validation.*`` counts as val)."""
    out: dict[str, list[Path]] = {}
    for split, stems in (("train", ("train",)), ("val", ("val", "validation")), ("test", ("test",))):
        found = [folder / f"{stem}{ext}" for stem in stems for ext in EXTENSIONS]
        found = [p for p in found if p.is_file()]
        if found:
            out[split] = found
    return out


def expand_files(spec: str) -> list[Path]:
    """Files named by a path or a glob; a :class:`UserError` when nothing matches or a type is unknown."""
    paths = sorted(Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise UserError(f"data source {spec!r} matches no file")
    for path in paths:
        if path.suffix.lower() not in EXTENSIONS:
            raise UserError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}")
    return paths


def source_list(spec: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    return [str(s) for s in spec]
