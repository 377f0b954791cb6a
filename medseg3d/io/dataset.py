"""Dataset discovery for the two layouts users have, read as they are (no conversion step).

- Medical Segmentation Decathlon (MSD): `dataset.json` with `modality` (id -> name), `labels`
  (id -> name) and a `training` list of `{"image", "label"}`; images are one file per case, 4D
  (channels last) when multi-channel.
- nnU-Net v2 raw: `dataset.json` with `channel_names` (id -> name), `labels` (name -> id),
  `numTraining`, `file_ending`; `imagesTr/CASE_0000<ending>` one file per channel,
  `labelsTr/CASE<ending>`.

Files are NIfTI (`.nii.gz`, `.nii`), NRRD (`.nrrd`, `.nhdr`) or MetaImage (`.mha`, `.mhd`) in both
layouts (`medseg3d.io.formats`). `predict` inputs may also be DICOM series, one per sub-folder of the
input folder (`medseg3d.io.dicom`); training data in DICOM is not read (convert it first).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medseg3d.errors import DatasetError, InputError, Problem
from medseg3d.io.formats import FILE_SUFFIXES, LISTED_SUFFIXES, is_image_file, strip_image_suffix
from medseg3d.io.volume import read_header

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: its name, one image path per channel file (one 4D file for MSD), its label.

    A DICOM case has one image path, the series folder, and the SeriesInstanceUID chosen in it.
    """

    name: str
    images: tuple[Path, ...]
    label: Path | None = None
    series_uid: str | None = None


@dataclass
class DatasetSpec:
    """What `dataset.json` and the folders declare."""

    root: Path
    layout: str  # "msd" | "nnunet"
    name: str
    channel_names: list[str]
    labels: dict[int, str]
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    file_ending: str = ".nii.gz"

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of classes including background (labels are 0..K-1)."""
        return max(self.labels) + 1


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read `root/dataset.json` and find every case; `DatasetError` lists every structural problem."""
    spec, problems = discover(root)
    if problems:
        raise DatasetError(f"dataset {root} is not usable", problems)
    assert spec is not None  # no problems implies a spec
    return spec


def discover(root: str | Path) -> tuple[DatasetSpec | None, list[Problem]]:
    """Like `load_dataset` but returns the problems (for `verify`, which goes on to check voxels)."""
    root = Path(root)
    if not root.is_dir():
        return None, [Problem(None, str(root), "the dataset folder does not exist", "give the folder that holds dataset.json, imagesTr and labelsTr")]
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return None, [Problem(None, str(meta_path), "dataset.json is missing", "add a dataset.json in MSD or nnU-Net v2 format (see docs/data_formats.md)")]
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, [Problem(None, str(meta_path), f"dataset.json is not valid JSON ({exc})", "fix the JSON syntax at the position given")]
    if not isinstance(meta, dict):
        return None, [Problem(None, str(meta_path), "dataset.json must hold a JSON object", "see docs/data_formats.md")]
    if "channel_names" in meta:
        return _discover_nnunet(root, meta)
    if "modality" in meta:
        return _discover_msd(root, meta)
    return None, [Problem(None, str(meta_path), "dataset.json has neither 'modality' (MSD) nor 'channel_names' (nnU-Net v2)", "add the key for your layout (docs/data_formats.md)")]


def _parse_id_map(obj: object, what: str, path: Path, problems: list[Problem]) -> dict[int, str]:
    if not isinstance(obj, dict) or not obj:
        problems.append(Problem(None, str(path), f"'{what}' must be a non-empty object", f"write '{what}' as {{\"0\": \"name\", ...}}"))
        return {}
    out: dict[int, str] = {}
    for key, value in obj.items():
        try:
            out[int(key)] = str(value)
        except (TypeError, ValueError):
            problems.append(Problem(None, str(path), f"'{what}' key {key!r} is not an integer id", f"use integer ids as keys in '{what}'"))
    return out


def _check_labels(labels: dict[int, str], path: Path, problems: list[Problem]) -> None:
    if labels and sorted(labels) != list(range(len(labels))):
        problems.append(Problem(None, str(path), f"label ids {sorted(labels)} are not consecutive from 0", "number the labels 0 (background), 1, 2, ... without gaps"))


def _discover_msd(root: Path, meta: dict) -> tuple[DatasetSpec | None, list[Problem]]:
    meta_path = root / "dataset.json"
    problems: list[Problem] = []
    modality = _parse_id_map(meta.get("modality"), "modality", meta_path, problems)
    labels = _parse_id_map(meta.get("labels"), "labels", meta_path, problems)
    _check_labels(labels, meta_path, problems)
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        problems.append(Problem(None, str(meta_path), "'training' must be a non-empty list of {image, label}", "list every training case in dataset.json"))
        training = []
    cases: list[Case] = []
    listed_labels: set[str] = set()
    listed_images: set[str] = set()
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            problems.append(Problem(None, str(meta_path), f"training entry {i} is not {{\"image\": ..., \"label\": ...}}", "give both paths for every entry"))
            continue
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve()
        name = strip_image_suffix(image.name)
        listed_images.add(image.name)
        listed_labels.add(label.name)
        if not image.is_file():
            problems.append(Problem(name, str(image), "the image listed in dataset.json does not exist", "add the file or remove the entry from 'training'"))
        if not label.is_file():
            problems.append(Problem(name, str(label), "the case has no label file", "add the label to labelsTr or remove the case from 'training'"))
        if image.is_file() and label.is_file():
            cases.append(Case(name, (image,), label))
    for folder, listed, what in (("labelsTr", listed_labels, "label"), ("imagesTr", listed_images, "image")):
        for path in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            if is_image_file(path) and path.name not in listed:
                other = "image" if what == "label" else "label"
                problems.append(Problem(strip_image_suffix(path.name), str(path), f"this {what} has no {other} listed in dataset.json 'training'", f"add the case to 'training' with its {other}, or remove the file"))
    test_cases = []
    for entry in meta.get("test", []) or []:
        image = (root / (entry["image"] if isinstance(entry, dict) else entry)).resolve()
        label = root / "labelsTs" / image.name
        test_cases.append(Case(strip_image_suffix(image.name), (image,), label if label.is_file() else None))
    channel_names = [modality[k] for k in sorted(modality)]
    spec = DatasetSpec(root, "msd", str(meta.get("name", root.name)), channel_names, labels, cases, test_cases)
    return spec, problems


def _discover_nnunet(root: Path, meta: dict) -> tuple[DatasetSpec | None, list[Problem]]:
    meta_path = root / "dataset.json"
    problems: list[Problem] = []
    channels = _parse_id_map(meta.get("channel_names"), "channel_names", meta_path, problems)
    raw_labels = meta.get("labels")
    labels: dict[int, str] = {}
    if not isinstance(raw_labels, dict) or not raw_labels:
        problems.append(Problem(None, str(meta_path), "'labels' must be a non-empty object name -> id", 'write "labels": {"background": 0, "organ": 1}'))
    else:
        for name, value in raw_labels.items():
            if isinstance(value, (list, tuple)):
                problems.append(Problem(None, str(meta_path), f"label {name!r} is a region (list of ids), which medseg3d does not support yet", "use one integer id per label"))
            elif isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
                labels[int(value)] = str(name)
            else:
                problems.append(Problem(None, str(meta_path), f"label {name!r} has id {value!r}, not an integer", "use integer ids"))
    _check_labels(labels, meta_path, problems)
    ending = meta.get("file_ending", ".nii.gz")
    endings = [e for v in FILE_SUFFIXES.values() for e in v]
    if ending not in endings:
        problems.append(Problem(None, str(meta_path), f"file_ending {ending!r} is not supported (one of {', '.join(endings)})", "convert the images to .nii.gz (or .nrrd/.mha)"))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            problems.append(Problem(None, str(folder), "the folder is missing", f"put the training {'images' if folder is images_dir else 'labels'} in {folder.name}/"))
    by_case = _group_channel_files(images_dir, ending, problems) if images_dir.is_dir() else {}
    label_files = {p.name[: -len(ending)]: p for p in sorted(labels_dir.glob(f"*{ending}"))} if labels_dir.is_dir() else {}
    cases: list[Case] = []
    n_channels = len(channels)
    for name in sorted(set(by_case) | set(label_files)):
        files = by_case.get(name, {})
        label = label_files.get(name)
        if label is None:
            problems.append(Problem(name, str(images_dir / f"{name}_0000{ending}"), "the image has no label", f"add labelsTr/{name}{ending} or remove the image"))
            continue
        if not files:
            problems.append(Problem(name, str(label), "the label has no image", f"add imagesTr/{name}_0000{ending} or remove the label"))
            continue
        missing = [i for i in range(n_channels) if i not in files]
        extra = sorted(set(files) - set(range(n_channels)))
        for i in missing:
            problems.append(Problem(name, str(images_dir / f"{name}_{i:04d}{ending}"), f"channel {i} ({channels.get(i, '?')}) is missing; dataset.json declares {n_channels} channel(s)", "add the file or fix channel_names"))
        for i in extra:
            problems.append(Problem(name, str(files[i]), f"channel file {i} is beyond the {n_channels} declared channel(s)", "remove it or declare the channel in channel_names"))
        if not missing:
            cases.append(Case(name, tuple(files[i] for i in range(n_channels)), label))
    declared = meta.get("numTraining")
    if isinstance(declared, int) and declared != len(label_files):
        problems.append(Problem(None, str(meta_path), f"numTraining is {declared} but labelsTr holds {len(label_files)} label(s)", "set numTraining to the number of training cases"))
    test_groups = _group_channel_files(root / "imagesTs", ending, []) if (root / "imagesTs").is_dir() else {}
    test_cases = []
    for name, files in sorted(test_groups.items()):
        label = root / "labelsTs" / f"{name}{ending}"
        test_cases.append(Case(name, tuple(files[i] for i in sorted(files)), label if label.is_file() else None))
    spec = DatasetSpec(root, "nnunet", str(meta.get("name", root.name)), [channels[k] for k in sorted(channels)], labels, cases, test_cases, ending)
    return spec, problems


def _group_channel_files(folder: Path, ending: str, problems: list[Problem]) -> dict[str, dict[int, Path]]:
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(folder.glob(f"*{ending}")):
        if path.name.startswith("."):
            continue
        match = _CHANNEL_RE.match(path.name[: -len(ending)])
        if not match:
            problems.append(Problem(strip_image_suffix(path.name), str(path), "the image name lacks the _XXXX channel suffix nnU-Net v2 requires", f"rename it to {strip_image_suffix(path.name)}_0000{ending}"))
            continue
        groups[match["case"]][int(match["ch"])] = path
    return dict(groups)


def find_input_cases(
    path: str | Path, num_channels: int, file_ending: str | None = None, *, series_uid: str | None = None
) -> list[Case]:
    """Cases to predict: a single file, or a folder in MSD naming (`CASE.nii.gz`, 4D when several
    channels) or nnU-Net naming (`CASE_0000.nii.gz`, ...), NIfTI, NRRD or MHA/MHD, and DICOM series
    (each sub-folder holding one is a case; a folder that is one series is one case). `InputError`
    lists every problem."""
    cases, problems = input_cases_and_problems(path, num_channels, file_ending, series_uid=series_uid)
    if problems:
        lines = "\n  ".join(f"case {name}: {why}" for name, why in problems)
        raise InputError(f"input channels do not match the model:\n  {lines}")
    return cases


def input_cases_and_problems(
    path: str | Path, num_channels: int, file_ending: str | None = None, *, series_uid: str | None = None
) -> tuple[list[Case], list[tuple[str, str]]]:
    """`find_input_cases` that keeps going: the usable cases and `(case, why)` for each case that is not
    (wrong channel count or files, unreadable header, a DICOM folder with several series, missing
    slices or uneven spacing), so one bad case does not stop a folder.

    `series_uid` chooses the series in DICOM folders holding several (`--series-uid`).
    `InputError` only when `path` itself is unusable (missing, not an image, no image inside, or
    itself a DICOM series folder that cannot be used).
    """
    from medseg3d.io.dicom import series_ids

    path = Path(path)
    if path.is_file():
        if not is_image_file(path):
            raise InputError(f"{path} is not an image file medseg3d reads ({LISTED_SUFFIXES}); give a "
                             "DICOM series as the folder holding its files")
        stem = strip_image_suffix(path.name)
        match = _CHANNEL_RE.match(stem)
        if match and num_channels > 1:
            files = [path.with_name(f"{match['case']}_{i:04d}{path.name[len(stem):]}") for i in range(num_channels)]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise InputError(f"case {match['case']}: channel files missing: {', '.join(missing)}")
            return [Case(match["case"], tuple(files))], []
        name = match["case"] if match else stem
        _check_channels(Case(name, (path,)), num_channels)
        return [Case(name, (path,))], []
    if not path.is_dir():
        raise InputError(f"input {path} does not exist; give an image file, a folder of them or DICOM series folders")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and is_image_file(p)
             and (file_ending is None or p.name.endswith(file_ending))]
    series_dirs = [p for p in entries if p.is_dir() and series_ids(p)]
    if not files and not series_dirs:
        if series_ids(path):  # the folder is itself one series: one case, its problems are the input's
            dicom_cases, dicom_problems = _dicom_cases([path], num_channels, series_uid)
            if dicom_problems:
                raise InputError(dicom_problems[0][1])
            return dicom_cases, []
        raise InputError(f"no image files ({LISTED_SUFFIXES}) or DICOM series folders in {path}")
    cases, problems = _file_cases(files, num_channels)
    dicom_cases, dicom_problems = _dicom_cases(series_dirs, num_channels, series_uid)
    taken = {c.name for c in cases} | {name for name, _ in problems}
    for case in dicom_cases:
        if case.name in taken:
            why = f"both image file(s) and the DICOM folder {case.images[0]} are named {case.name}; rename one"
            problems.append((case.name, why))
        else:
            cases.append(case)
    return sorted(cases, key=lambda c: c.name), problems + dicom_problems


def _file_cases(files: list[Path], num_channels: int) -> tuple[list[Case], list[tuple[str, str]]]:
    """Cases of the image files of one folder (MSD or nnU-Net naming) and `(case, why)` of the unusable ones."""
    cases: list[Case] = []
    problems: list[tuple[str, str]] = []
    if not files:
        return cases, problems
    stems = [strip_image_suffix(p.name) for p in files]
    if all(_CHANNEL_RE.match(s) for s in stems):
        groups: dict[str, dict[int, Path]] = defaultdict(dict)
        for p, s in zip(files, stems):
            m = _CHANNEL_RE.match(s)
            groups[m["case"]][int(m["ch"])] = p  # type: ignore[index]
        for name, chans in sorted(groups.items()):
            if sorted(chans) != list(range(num_channels)):
                why = f"has channel files {sorted(chans)}, the model needs 0..{num_channels - 1}"
                problems.append((name, why))
            else:
                cases.append(Case(name, tuple(chans[i] for i in range(num_channels))))
        return cases, problems
    for p, s in zip(files, stems):
        case = Case(s, (p,))
        try:
            _check_channels(case, num_channels)
        except InputError as exc:
            problems.append((s, str(exc).removeprefix(f"case {s}: ")))
        else:
            cases.append(case)
    return cases, problems


def _dicom_cases(
    folders: list[Path], num_channels: int, series_uid: str | None
) -> tuple[list[Case], list[tuple[str, str]]]:
    """One case per DICOM series folder (named after it), its series chosen and slice headers checked."""
    from medseg3d.io.dicom import check_series

    cases: list[Case] = []
    problems: list[tuple[str, str]] = []
    for folder in folders:
        try:
            series = check_series(folder, series_uid)
        except InputError as exc:
            problems.append((folder.name, str(exc)))
            continue
        if num_channels != 1:
            why = (f"the DICOM series in {folder} is one channel, the model expects {num_channels}; give the "
                   "channels as CASE_0000, CASE_0001, ... files")
            problems.append((folder.name, why))
            continue
        cases.append(Case(folder.name, (folder,), series_uid=series.series_uid))
    return cases, problems


def _check_channels(case: Case, num_channels: int) -> None:
    header = read_header(case.images[0])
    found = header.shape[3] if len(header.shape) == 4 else 1
    if found != num_channels:
        raise InputError(f"case {case.name}: {case.images[0]} has {found} channel(s), the model expects {num_channels}; "
                         "give one 4D file with all channels or CASE_0000, CASE_0001, ... files")
