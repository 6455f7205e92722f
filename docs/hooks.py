"""mkdocs hook: the benchmark plots live in benchmarks/figures/ (where the scripts write them); the
site serves them at benchmarks/figures/ without a second copy in docs/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FIGURES = Path(__file__).resolve().parent.parent / "benchmarks" / "figures"


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for plot in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/figures/{plot.name}", abs_src_path=str(plot)))
    return files
