"""The experiment folder: its layout, local paths and URIs, atomic writes, the study's place.

An experiment lives at ``<storage>/<name>``, where storage is a local folder (default
``results/ray``) or a URI that pyarrow understands (``s3://bucket/prefix``, ``gs://...``,
``file:///...``), as Ray Tune's own storage does. Its layout::

    space.yaml                the resolved search space (written once, before Ray starts)
    optuna.journal            the Optuna study (local storage; see :meth:`Experiment.journal_path`)
    asha_rungs.json           a readable copy of ASHA's rungs
    tuner.pkl, experiment_state-*.json, trial_<id>/...   Ray Tune's own files
    checkpoints/<trial id>/   the trial's own last two checkpoints (local storage)

Every other module asks this one for a path; nothing else tests for ``"://"``. Local files
are written atomically (a temporary file in the same folder, then ``os.replace``), object
stores write whole objects on close, which is atomic for readers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["CHECKPOINTS_DIR", "JOURNAL_FILE", "RESULTS", "RUNGS_FILE", "SPACE_FILE", "TUNER_FILE",
           "Experiment", "atomic_write", "is_uri", "new_dir", "resolve_storage", "swap_dir"]

RESULTS = Path("results")  # exports go to results/<name>, local Ray storage to results/ray
SPACE_FILE = "space.yaml"
JOURNAL_FILE = "optuna.journal"
RUNGS_FILE = "asha_rungs.json"
TUNER_FILE = "tuner.pkl"
CHECKPOINTS_DIR = "checkpoints"
TRIAL_PREFIX = "trial_"
STATE_PREFIX = "experiment_state-"
# Where the Optuna journal of a URI experiment lives: a journal needs a POSIX file lock.
JOURNAL_CACHE = Path("~/.cache/ssam_tune/optuna")


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for ``scheme://...`` (object storage or ``file://``), False for a plain path."""
    return path is not None and "://" in str(path)


def resolve_storage(storage: str) -> str:
    """A storage location in canonical form: URIs without a trailing slash, local paths
    absolute (trials may run with another working directory)."""
    if is_uri(storage):
        return str(storage).rstrip("/")
    return str(Path(storage).expanduser().resolve())


# ---------------------------------------------------------------------------------------------
# atomic local writes
# ---------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], None], *,
                 fsync: bool = False) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``: a reader
    sees the old file or the new one, never half of one. ``data`` is text, bytes, or a
    function that writes to the open binary file (``torch.save``). ``fsync`` forces the bytes
    to disk before the rename (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # plain open: the umask's permissions
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clear_partial_writes(folder: Path) -> None:
    """Remove the temporary files of writes cut short by a crash (see :func:`atomic_write`)."""
    for stale in folder.glob(".*.tmp*"):  # also .<name>.tmp<pid>, the older naming
        stale.unlink(missing_ok=True)


def new_dir(parent: Path, name: str) -> Path:
    """An empty scratch folder ``parent/.<name>.<pid>.new`` (a leftover of a crash is cleared)."""
    path = parent / f".{name}.{os.getpid()}.new"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def swap_dir(built: Path, dest: Path) -> None:
    """Put the folder ``built`` in place of ``dest`` (the old one is renamed away, then removed)."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.{os.getpid()}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(built, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the experiment folder
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Experiment:
    """The folder (or URI) ``root`` of one experiment. ``name`` is its last component."""

    root: str

    @classmethod
    def at(cls, storage: str, name: str) -> Experiment:
        return cls(f"{resolve_storage(storage)}/{name}")

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return not is_uri(self.root)

    @property
    def path(self) -> Path:
        """The local folder; ValueError for a URI (use the file methods instead)."""
        if not self.is_local:
            raise ValueError(f"{self.root} is not a local folder")
        return Path(self.root)

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _fs(self):
        from pyarrow import fs as pafs

        return pafs.FileSystem.from_uri(self.root)  # (filesystem, path inside it)

    # -- files ---------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        if self.is_local:
            return (self.path / rel).exists()
        from pyarrow import fs as pafs

        filesystem, root = self._fs()
        target = f"{root}/{rel}" if rel else root
        return filesystem.get_file_info(target).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        if self.is_local:
            try:
                return (self.path / rel).read_bytes()
            except FileNotFoundError:
                return None
        filesystem, root = self._fs()
        try:
            with filesystem.open_input_stream(f"{root}/{rel}") as src:
                return src.read()
        except FileNotFoundError:
            return None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def write_text(self, rel: str, text: str) -> None:
        """Write one file of the experiment (atomically on local storage)."""
        if self.is_local:
            atomic_write(self.path / rel, text)
            return
        filesystem, root = self._fs()
        parent = f"{root}/{rel}".rsplit("/", 1)[0]
        filesystem.create_dir(parent, recursive=True)
        with filesystem.open_output_stream(f"{root}/{rel}") as dst:
            dst.write(text.encode())

    def make(self) -> None:
        """Create the folder (a no-op on object stores, which have no folders)."""
        if self.is_local:
            self.path.mkdir(parents=True, exist_ok=True)

    # -- what lives where ----------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether Ray has written this experiment (``--resume`` needs it; a new run must not
        overwrite it)."""
        return self.exists(TUNER_FILE)

    def journal_path(self) -> str:
        """The local path of the Optuna journal: inside the folder on local storage; for a
        URI, a per-experiment file under ``~/.cache/ssam_tune/optuna`` keyed by the whole URI
        (a journal needs a file lock, which object stores do not offer)."""
        if self.is_local:
            return str(self.path / JOURNAL_FILE)
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        path = JOURNAL_CACHE.expanduser() / f"{self.name}-{digest}.journal"
        legacy = JOURNAL_CACHE.expanduser() / f"{self.name}.journal"  # written before the URI key
        return str(legacy if legacy.is_file() and not path.is_file() else path)

    def checkpoint_dir(self, trial_id: str) -> Path | None:
        """The trial's own checkpoint folder (local storage only; with a URI only Ray's
        checkpoints exist)."""
        return self.path / CHECKPOINTS_DIR / trial_id if self.is_local else None

    def fetch_small_files(self, dest: Path) -> Path:
        """A local folder with the files the exports read: the folder itself when local; for
        a URI, a copy in ``dest`` of space.yaml, the journal, experiment_state-*.json and each
        trial's params.json, result.json and error.txt (checkpoints are never fetched)."""
        if self.is_local:
            return self.path
        from pyarrow import fs as pafs

        filesystem, root = self._fs()
        wanted = {"params.json", "result.json", "error.txt"}
        for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            rel = Path(info.path).relative_to(root)
            top_level = len(rel.parts) == 1 and (rel.name in (SPACE_FILE, JOURNAL_FILE)
                                                 or rel.name.startswith(STATE_PREFIX))
            in_trial = len(rel.parts) == 2 and rel.parts[0].startswith(TRIAL_PREFIX) and rel.name in wanted
            if top_level or in_trial:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with filesystem.open_input_stream(info.path) as src:
                    target.write_bytes(src.read())
        journal = Path(self.journal_path())
        if not (dest / JOURNAL_FILE).exists() and journal.is_file():
            shutil.copyfile(journal, dest / JOURNAL_FILE)
        return dest
