"""The experiment folder: its layout, local paths and URIs, the study's place.

An experiment lives at ``<storage>/<name>``, where storage is a local folder (default
``results/ray``) or a URI that pyarrow understands (``s3://bucket/prefix``, ``gs://...``,
``file:///...``), as Ray Tune's own storage does. Its layout::

    space.yaml                the resolved search space (written once, before Ray starts)
    optuna.journal            the Optuna study (the live file on local storage; for a URI, the
                              copy uploaded with Ray's experiment state: :meth:`Experiment.journal_path`)
    asha_rungs.json           a readable copy of ASHA's rungs
    tuner.pkl, experiment_state-*.json, trial_<id>/...   Ray Tune's own files
    trial_<id>/checkpoint_*/  Ray's checkpoints of a trial (its last tune.keep_checkpoints)
    trial_<id>/params.json    the trial's config: {META: bookkeeping, "config": training config}
    trial_<id>/result.json    its reports, one per epoch (:func:`full_fidelity` reads the last)
    checkpoints/<trial id>/   the trial's own newest checkpoint while it runs (local storage)
    diagnostics.json          measurements of the front points (tune.diagnostics), by trial id

Every other module asks this one (or :func:`ssam_tune.storage.files.is_uri`) whether a path
is a URI. Local files are written atomically (:mod:`ssam_tune.storage.files`).
"""

from __future__ import annotations

import hashlib
import numbers
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ssam_tune.storage.files import atomic_write, is_uri

__all__ = ["CHECKPOINTS_DIR", "CKPT_FILE", "DIAGNOSTICS_FILE", "JOURNAL_FILE", "META", "RESULTS", "RUNGS_FILE",
           "SPACE_FILE", "TUNER_FILE", "Experiment", "full_fidelity", "resolve_storage"]

RESULTS = Path("results")  # exports go to results/<name>, local Ray storage to results/ray
SPACE_FILE = "space.yaml"
JOURNAL_FILE = "optuna.journal"
RUNGS_FILE = "asha_rungs.json"
TUNER_FILE = "tuner.pkl"
DIAGNOSTICS_FILE = "diagnostics.json"
CKPT_FILE = "checkpoint.pt"  # a training checkpoint inside a checkpoint folder (Ray's, the trial's own)
CHECKPOINTS_DIR = "checkpoints"
TRIAL_PREFIX = "trial_"
RAY_CHECKPOINT_PREFIX = "checkpoint_"  # Ray's checkpoint folders inside a trial's folder
STATE_PREFIX = "experiment_state-"
# Ray 2.60 stores each trial as a JSON string (indent 2) inside its state file: the trial's own
# id and status are top-level keys of that string, in the file \n  \"trial_id\": \"<id>\" and,
# further on, \n  \"status\": \"RUNNING\" (the keys of nested objects are indented further).
_STATE_KEY = re.compile(r'\\n  \\"(trial_id|status)\\": \\"([^"\\]+)\\"')
_STATE_CHUNK = 1 << 22  # bytes of a state file read at a time
# Where the Optuna journal of a URI experiment lives: a journal needs a POSIX file lock.
JOURNAL_CACHE = Path("~/.cache/ssam_tune/optuna")
# The key of a trial's config (Ray's trial.config, its params.json) that holds the search's
# bookkeeping (label, kind, anchor, optuna_number, ...); the training config is under "config".
# Here, in the lowest layer, so that the searcher, the console, the live TensorBoard and the
# exports (which must not import the Ray searcher) name it from one place.
META = "ssam_tune"


def full_fidelity(result: dict | None, epochs: int | None) -> bool:
    """Whether a trial's last report (a Ray result, or the last line of its ``result.json``)
    is a completed run of all its ``epochs`` (None: not known, any completed run counts).

    The one rule of what counts as full fidelity: the only trials the study holds as
    COMPLETE, that keep a checkpoint, and that a front is built from. An epoch that is not a
    number (a truncated or foreign report) counts as 0."""
    result = result or {}
    if result.get("status") != "completed":
        return False
    epoch = result.get("epoch")
    reached = epoch if isinstance(epoch, numbers.Real) and not isinstance(epoch, bool) else 0
    return epochs is None or reached >= epochs


def resolve_storage(storage: str) -> str:
    """A storage location in canonical form: URIs without a trailing slash, local paths
    absolute (trials may run with another working directory)."""
    if is_uri(storage):
        return str(storage).rstrip("/")
    return str(Path(storage).expanduser().resolve())



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
        self.write_bytes(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one file of the experiment (atomically on local storage; an object store
        makes the object visible whole when the stream closes)."""
        if self.is_local:
            atomic_write(self.path / rel, data)
            return
        filesystem, root = self._fs()
        parent = f"{root}/{rel}".rsplit("/", 1)[0]
        filesystem.create_dir(parent, recursive=True)
        with filesystem.open_output_stream(f"{root}/{rel}") as dst:
            dst.write(data)

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

    @property
    def resumable(self) -> bool:
        """Whether Ray saved a state to resume from: a driver killed in its first seconds
        leaves ``tuner.pkl`` without one, and Ray would then restart it in a broken way."""
        return self.started and self.state_file() is not None

    def state_file(self) -> str | None:
        """Ray's newest experiment state file (its name), the one a resumed driver restores."""
        if self.is_local:
            names = [p.name for p in self.path.glob(f"{STATE_PREFIX}*.json")]
        else:
            from pyarrow import fs as pafs

            filesystem, root = self._fs()
            names = [i.base_name for i in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
        return max((n for n in names if n.startswith(STATE_PREFIX) and n.endswith(".json")), default=None)

    def trial_statuses(self) -> dict[str, str]:
        """Trial id -> status (PENDING, RUNNING, TERMINATED, ERROR, ...) in Ray's newest
        experiment state here: what a driver resumed now would restore. Empty without one.

        Ray writes its state to a local staging folder and uploads it in the background, file
        by file; only this copy tells what a resumed driver will run. The file holds ~50 KB
        per trial: it is scanned 4 MiB at a time, never parsed whole."""
        name = self.state_file()
        if name is None:
            return {}
        if self.is_local:
            stream = open(self.path / name, "rb")  # noqa: SIM115 - closed by the with below
        else:
            filesystem, root = self._fs()
            stream = filesystem.open_input_stream(f"{root}/{name}")
        statuses: dict[str, str] = {}
        trial_id, tail = None, ""
        with stream:
            while chunk := stream.read(_STATE_CHUNK):
                text = tail + chunk.decode("utf-8", errors="replace")
                for m in _STATE_KEY.finditer(text):  # a trial's status follows its id
                    if m.group(1) == "trial_id":
                        trial_id = m.group(2)
                    elif trial_id is not None:
                        statuses[trial_id] = m.group(2)
                tail = text[-80:]  # a key cut by the chunk boundary is found in the next round
        return statuses

    def journal_path(self, key: str | None = None) -> str:
        """The local path of the Optuna journal. On local storage: inside the folder. For a
        URI (a journal needs a file lock, which object stores do not offer): the driver's
        working copy ``~/.cache/ssam_tune/optuna/<name>-<key>.journal``, where ``key`` is the
        experiment's own random key (the searcher's), so experiments never share a study even
        with the same name or URI. The copy travels with the experiment inside the searcher
        state Ray saves, and as ``optuna.journal`` next to it (see ``SsamSearcher.save``).
        Without a key: the file older versions used, keyed by the whole URI."""
        if self.is_local:
            return str(self.path / JOURNAL_FILE)
        if key is not None:
            return str(JOURNAL_CACHE.expanduser() / f"{self.name}-{key}.journal")
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        path = JOURNAL_CACHE.expanduser() / f"{self.name}-{digest}.journal"
        legacy = JOURNAL_CACHE.expanduser() / f"{self.name}.journal"  # written before the URI key
        return str(legacy if legacy.is_file() and not path.is_file() else path)

    def checkpoint_dir(self, trial_id: str) -> Path | None:
        """The trial's own checkpoint folder (local storage only; with a URI only Ray's
        checkpoints exist)."""
        return self.path / CHECKPOINTS_DIR / trial_id if self.is_local else None

    def train_run(self, trial_id: str) -> tuple[str, str]:
        """(storage_path, name) of a multi-worker trial's Ray Train run: the trial's own
        folder, so the run's ``checkpoint_*`` folders are the trial's checkpoints (listed,
        pruned and deleted as Ray Tune's are) and a re-run trial resumes its run from them."""
        return self.root, f"{TRIAL_PREFIX}{trial_id}"

    def trial_checkpoints(self, trial_id: str) -> list[str]:
        """Ray's checkpoint folders of a trial, relative to the experiment."""
        rel = f"{TRIAL_PREFIX}{trial_id}"
        if self.is_local:
            folder = self.path / rel
            return [f"{rel}/{d.name}" for d in sorted(folder.glob(f"{RAY_CHECKPOINT_PREFIX}*")) if d.is_dir()]
        from pyarrow import fs as pafs

        filesystem, root = self._fs()
        try:
            infos = filesystem.get_file_info(pafs.FileSelector(f"{root}/{rel}", allow_not_found=True))
        except OSError:
            return []
        return sorted(f"{rel}/{i.base_name}" for i in infos
                      if i.type == pafs.FileType.Directory and i.base_name.startswith(RAY_CHECKPOINT_PREFIX))

    def delete_checkpoints(self, trial_id: str, keep_newest: bool = False) -> int:
        """Delete the checkpoints of a finished trial: its own copy, and Ray's (all of them,
        or all but the newest with ``keep_newest``); returns how many of Ray's were deleted.
        Results and params stay."""
        gone = self.trial_checkpoints(trial_id)  # checkpoint_<zero-padded index>: sorted oldest first
        gone = gone[:-1] if keep_newest else gone
        for rel in gone:
            if self.is_local:
                shutil.rmtree(self.path / rel, ignore_errors=True)
            else:
                filesystem, root = self._fs()
                filesystem.delete_dir(f"{root}/{rel}")
        own = self.checkpoint_dir(trial_id)
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
        return len(gone)

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
            top_level = len(rel.parts) == 1 and (rel.name in (SPACE_FILE, JOURNAL_FILE, DIAGNOSTICS_FILE)
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
