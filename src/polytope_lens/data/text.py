"""Text data: CPython's pydoc topics, Jane Austen's novels and plain UTF-8 files, cut into ~200-word passages.

Passages are whitespace-normalised and end on a sentence boundary where one falls near the target length, so that
token codes are taken over natural prose rather than over fragments.
"""

from __future__ import annotations

import gzip
import re
import sys
import zlib
from pathlib import Path

import numpy as np

from polytope_lens.data._source import (
    INSTALL_MODELS_EXTRA,
    DataSource,
    data_dir,
    existing_file,
    first,
    package_version,
)
from polytope_lens.errors import InvalidInputError, MissingDependencyError

PASSAGE_WORDS = 200
"""Target passage length in words; a passage closes at the first sentence end at or after this many words."""

AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
"""Variable names in r-cran-janeaustenr, also the accepted ``austen:NOVEL`` values."""

AUSTEN_SYSTEM_DIRS = (Path("/usr/lib/R/site-library"),)
"""R library folders searched for an installed janeaustenr besides the data folder."""

AUSTEN_INSTALL = (
    'mkdir -p "${POLYTOPE_LENS_DATA:-$HOME/.local/share/polytope-lens}" && cd /tmp && '
    "apt-get download r-cran-janeaustenr && "
    'dpkg -x r-cran-janeaustenr_*.deb "${POLYTOPE_LENS_DATA:-$HOME/.local/share/polytope-lens}/janeaustenr"'
)

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """Cut `text` into whitespace-normalised passages of roughly `words` words.

    Sentences are accumulated until the passage reaches `words` words; a sentence longer than twice `words` is
    cut hard. A trailing piece shorter than a tenth of `words` joins the previous passage.

    Parameters
    ----------
    text : str
        Any text; runs of whitespace (newlines included) become one space.
    words : int
        Target passage length in words.

    Returns
    -------
    list of str
        Passages in reading order; empty when `text` has no words.
    """
    passages: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        tokens = sentence.split()
        while len(tokens) > 2 * words:  # runaway "sentence" (a table, code): hard cut
            passages.append(" ".join(current + tokens[: words - len(current)]))
            tokens, current = tokens[words - len(current):], []
        current += tokens
        if len(current) >= words:
            passages.append(" ".join(current))
            current = []
    if current:
        if passages and len(current) < max(1, words // 10):
            passages[-1] += " " + " ".join(current)
        else:
            passages.append(" ".join(current))
    return passages


def load_pydoc(limit: int | None) -> DataSource:
    """CPython's ``pydoc_data.topics``: each help topic cut into passages, labelled by topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    passages: list[str] = []
    labels: list[int] = []
    for i, name in enumerate(names):
        for passage in split_passages(topics[name]):
            passages.append(passage)
            labels.append(i)
    passages = list(first(passages, limit))
    labels = labels[: len(passages)]
    provenance = {
        "source": "CPython pydoc_data.topics",
        "python": sys.version.split()[0],
        "n_topics": len(names),
        "n_items": len(passages),
        "transform": f"whitespace-normalised, ~{PASSAGE_WORDS}-word passages per topic",
    }
    return DataSource("pydoc", "text", passages, np.asarray(labels, dtype=np.int64), names, provenance)


def find_austen() -> Path | None:
    """Path of janeaustenr's ``Rdata.rdx`` under the data folder or a system R library, or None."""
    root = data_dir()
    candidates = [root / "janeaustenr" / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data" / "Rdata.rdx"]
    candidates += [d / "janeaustenr" / "data" / "Rdata.rdx" for d in AUSTEN_SYSTEM_DIRS]
    for path in candidates:
        if path.is_file():
            return path
    if root.is_dir():
        return next(iter(sorted(root.rglob("janeaustenr/data/Rdata.rdx"))), None)
    return None


def read_austen(rdx: Path) -> dict[str, list[str]]:
    """Read the six novels from R's lazy-load database: a gzip index plus zlib records with a 4-byte header."""
    try:
        import rdata
    except ImportError:
        raise MissingDependencyError(
            f"Reading the Jane Austen texts needs the 'rdata' package; install it with {INSTALL_MODELS_EXTRA}."
        ) from None

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = parse(gzip.decompress(rdx.read_bytes()))
    blob = rdx.with_suffix(".rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        if name in AUSTEN_NOVELS:
            lines = parse(zlib.decompress(blob[int(offset): int(offset) + int(length)][4:]))
            novels[name] = [str(line) for line in np.asarray(lines).ravel()]
    return novels


def load_austen(novel: str | None, limit: int | None) -> DataSource:
    """Jane Austen's novels (all six, or one) as passages labelled by novel."""
    if novel is not None and novel not in AUSTEN_NOVELS:
        raise InvalidInputError(f"Unknown Austen novel {novel!r}; choose one of {', '.join(AUSTEN_NOVELS)}.")
    rdx = find_austen()
    if rdx is None:
        raise MissingDependencyError(
            f"The Jane Austen texts (Debian r-cran-janeaustenr) are not in {str(data_dir())!r} or "
            f"{', '.join(str(d) for d in AUSTEN_SYSTEM_DIRS)}; get them with: {AUSTEN_INSTALL}"
        )
    texts = read_austen(rdx)
    chosen = [novel] if novel else list(AUSTEN_NOVELS)
    passages: list[str] = []
    labels: list[int] = []
    for name in chosen:
        for passage in split_passages(" ".join(texts[name])):
            passages.append(passage)
            labels.append(AUSTEN_NOVELS.index(name))
        if limit is not None and len(passages) >= limit:
            break
    passages = list(first(passages, limit))
    provenance = {
        "source": "Debian r-cran-janeaustenr (Jane Austen's novels, public domain; package MIT)",
        "file": str(rdx),
        "reader": f"rdata {package_version('rdata')}",
        "novels": chosen,
        "n_items": len(passages),
        "transform": f"lines joined, whitespace-normalised, ~{PASSAGE_WORDS}-word passages per novel",
    }
    spec = f"austen:{novel}" if novel else "austen"
    return DataSource(spec, "text", passages, np.asarray(labels[: len(passages)], dtype=np.int64),
                      list(AUSTEN_NOVELS), provenance)


def load_text_file(path_text: str, spec: str, limit: int | None) -> DataSource:
    """A UTF-8 text file as passages."""
    path = existing_file(path_text, spec)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"Text file {str(path)!r} is not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8."
        ) from None
    passages = split_passages(text)
    if not passages:
        raise InvalidInputError(f"Text file {str(path)!r} holds no words; give a file with some text.")
    passages = list(first(passages, limit))
    provenance = {
        "source": "text file",
        "file": str(path.resolve()),
        "n_items": len(passages),
        "transform": f"whitespace-normalised, ~{PASSAGE_WORDS}-word passages",
    }
    return DataSource(f"text:{path}", "text", passages, None, None, provenance)

