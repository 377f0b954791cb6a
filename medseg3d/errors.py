"""The project's own exceptions. The CLI turns every `MedsegError` into one readable message and exit 2."""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem found in the user's data: which case, which file, what is wrong, how to fix it."""

    case: str | None
    file: str | None
    what: str
    fix: str

    def format(self) -> str:
        where = []
        if self.case:
            where.append(f"case {self.case}")
        if self.file:
            where.append(f"file {self.file}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{prefix}{self.what}. Fix: {self.fix}"


class MedsegError(Exception):
    """Base class of every error medseg3d reports to the user."""


class DatasetError(MedsegError):
    """The dataset on disk is malformed; carries every problem found, not just the first."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        lines = [f"{head} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p.format()}" for p in self.problems]
        return "\n".join(lines)


class PlanError(MedsegError):
    """plans.json is missing, of an unknown schema, or does not match the data or checkpoint."""


class CheckpointError(MedsegError):
    """A checkpoint is missing, truncated, corrupt, or was trained with another plan."""


class PackageError(MedsegError):
    """A model package (`medseg3d export`'s zip) is damaged, foreign, altered after export, or of an
    unknown format version."""


class BackendError(MedsegError):
    """A network backend (`--backend onnxruntime|openvino`, `export --format`) cannot be used: not
    installed, no exported network in the package, or an architecture that does not export."""


class InputError(MedsegError):
    """An input given on the command line (file, folder, option value) cannot be used."""


class OutputExistsError(MedsegError):
    """An output already exists and the user did not ask to overwrite it."""


class ConfigError(MedsegError):
    """An option or configuration name is invalid (names the valid choices)."""


class OutputError(MedsegError):
    """An output cannot be written (no permission, read-only or full disk); names the path. Nothing
    half-written is left behind (see `medseg3d.io.atomic`)."""


class CasesFailedError(MedsegError):
    """Some cases failed while the others were done; `failed` lists `(case, why)`, `summary` what was done.

    Raised at the end of a folder's work (predict, evaluate, final validation), so one bad case never
    stops the others; the CLI prints it like any MedsegError and exits 2.
    """

    def __init__(self, what: str, failed: list[tuple[str, str]], total: int, others: str, summary: object = None) -> None:
        """`what` names the work ("predict"); `others` says what became of the good cases."""
        self.failed = list(failed)
        self.summary = summary
        lines = "\n".join(f"  - case {name}: {why}" for name, why in self.failed)
        super().__init__(f"{what}: {len(self.failed)} of {total} case(s) failed ({others}):\n{lines}")


#: What to lower after CUDA runs out of memory, per command (the option names of that command).
_OOM_ADVICE = {
    "train": "lower --batch-size or --patch-size (e.g. half of one axis), or re-plan with a smaller --gpu-memory "
             "(`medseg3d plan DATA_DIR -o WORK_DIR --gpu-memory 8`) so the planner picks a smaller patch and batch",
    "plan": "give a smaller --gpu-memory (GB) than the GPU's total, or free the GPU (another process may hold "
            "memory: see nvidia-smi)",
    "predict": "lower --batch-size (network inputs per forward pass, e.g. --batch-size 1) or use --precision fp16, "
               "or predict on the CPU with --device cpu",
    "demo": "run it on the CPU with --device cpu",
    "validation": "predict the case alone with `medseg3d predict -m WORK_DIR -i CASE_FILE -o OUT --batch-size 1` "
                  "(or --device cpu); the trained checkpoints are saved",
}
_OUTPUT_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "the file system is read-only"}


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's (CUDA) out-of-memory error; never imports torch (no torch loaded: no torch error)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if isinstance(t, type))
    return bool(types) and isinstance(exc, types)


def out_of_memory_message(command: str | None) -> str:
    """The one message for a CUDA out-of-memory error in `command` (train, plan, predict, ..., or
    `validation`, training's final validation): what to lower."""
    advice = _OOM_ADVICE.get(command or "", "retry with --device cpu, or free the GPU (see nvidia-smi)")
    return f"the GPU ran out of memory; {advice}"


def os_error_message(exc: OSError, path: object = None, *, atomic_write: bool = False) -> str | None:
    """One line for a permission / read-only / full-disk `OSError` on `path` (default: the error's file), else None.

    `atomic_write`: the error came from `medseg3d.io.atomic`, which removed its temporary file, so the
    message can promise that nothing half-written was left.
    """
    why = _OUTPUT_ERRNOS.get(exc.errno if exc.errno is not None else -1)
    if why is None:
        return None
    where = path if path is not None else (exc.filename or "a file")
    verb = "write" if atomic_write or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "access"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there or write to another folder, then rerun (finished outputs are kept)"
    else:
        fix = "choose a folder you can write to, or fix its permissions, then rerun"
    left = "; nothing half-written was left" if atomic_write else ""
    return f"cannot {verb} {where}: {why}{left}. Fix: {fix}"


def user_error(exc: BaseException, command: str | None = None) -> MedsegError | None:
    """`exc` as the MedsegError a user should see (out of memory, permission, full disk), or None for a bug."""
    if isinstance(exc, MedsegError):
        return exc
    if is_out_of_memory(exc):
        return MedsegError(out_of_memory_message(command))
    if isinstance(exc, OSError):
        message = os_error_message(exc)
        if message is not None:
            return OutputError(message)
    return None


def describe_case_error(exc: BaseException, command: str | None = None) -> str:
    """Why one case failed, in one line: the user message when there is one, else `Type: message`."""
    known = user_error(exc, command)
    return str(known) if known is not None else f"{type(exc).__name__}: {exc}"
