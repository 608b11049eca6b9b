"""``ctseverity run`` on studies in a PACS: pull over DICOMweb, grade, push the results back.

``ctseverity run dicomweb+http://host:8042/dicom-web --study UID --out DIR --store``:

1. the studies: the ``--study`` UIDs, and/or those a QIDO-RS query finds (``--study-date``, ``--modality``);
2. per study, the series headers (WADO-RS metadata) and the series to grade chosen by the rule a DICOM folder's
   series is chosen by (:data:`monai_ext.io.dicom_select.RULE`; each series left out is logged with its reason);
3. that series retrieved (WADO-RS) into ``DIR/pacs/<StudyInstanceUID>/`` (kept, so that a rerun resumes
   without retrieving it again);
4. the usual batch (:func:`pipelines.batch.run_batch`) over those folders: ``DIR/<StudyInstanceUID>/`` with the
   DICOM SEG, SR and overview capture in ``dicom/``, ``results.csv``, ``report.html``;
5. with ``--store``, the SEG, SR and overview capture of each graded study sent back into its study (STOW-RS).

``DIR/pacs.json`` records the server, the series chosen per study and what was stored (UIDs only). Patient
identifiers seen in the retrieved headers are redacted from every log line unless ``--keep-identifiers``
(:mod:`pipelines.dicom.privacy`). See ``docs/pacs.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from tqdm.auto import tqdm

from monai_ext.errors import CTSeverityError
from monai_ext.io import atomic_write_text
from monai_ext.io.dicom_select import RULE, THIN_MM, SeriesInfo, choose_series, scan_headers
from pipelines.dicom import dicomweb
from pipelines.dicom.privacy import identifier_strings, patient_identifiers, redacting

__all__ = ["PACS_DIR", "RECORD", "STORED_OUTPUTS", "PacsStudy", "choose_study_series", "pull_study", "store_study",
           "run_pacs", "check_uid"]

log = logging.getLogger(__name__)

#: folder of ``DIR`` the retrieved series go to (one folder per study, named by its Study Instance UID)
PACS_DIR = "pacs"

#: what a PACS run records in ``DIR``: server, chosen series, stored instances
RECORD = "pacs.json"

#: the outputs of a study that ``--store`` sends (keys of ``result.json``'s ``outputs``)
STORED_OUTPUTS = ("dicom_seg", "dicom_sr", "dicom_overview")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(uid: str) -> str:
    """A Study Instance UID as given (digits and dots, at most 64 characters).

    Raises:
        ValueError: anything else.
    """
    text = str(uid).strip()
    if not _UID.match(text) or len(text) > 64:
        raise ValueError(f"--study {uid!r}: not a DICOM UID (digits and dots, at most 64 characters)")
    return text


@dataclass
class PacsStudy:
    """One study of a PACS run.

    Attributes:
        uid: Study Instance UID (also the study's name in ``DIR``).
        folder: where its chosen series was retrieved to (``None`` when it could not be).
        series: the series chosen.
        error: why it could not be retrieved or stored (``""``: no error).
        stored: SOP Instance UIDs stored into the study.
    """

    uid: str
    folder: Path | None = None
    series: SeriesInfo | None = None
    error: str = ""
    stored: list[str] = field(default_factory=list)


def _files_of(folder: Path) -> set[str]:
    return {p.name[: -len(".dcm")] for p in folder.glob("*.dcm")} if folder.is_dir() else set()


def choose_study_series(headers: dict[str, list[pydicom.Dataset]], uid: str) -> tuple[SeriesInfo, str, list[str]]:
    """The series of a study to grade, by the rule a DICOM folder's series is chosen by
    (:func:`monai_ext.io.dicom_select.choose_series`), from the headers of its series.

    Args:
        headers: Series Instance UID -> one header per instance (:func:`pipelines.dicom.dicomweb.series_headers`).
        uid: the Study Instance UID, for messages.

    Returns:
        The series chosen, the rule's message (which series was read, why each other was not; ``""`` when the
        study has one CT image series), and one line per series whose instances were left out before the choice
        (localizers, dose reports, non-images) with the reason.

    Raises:
        CTSeverityError: no series fit (each one's reason given).
    """
    named = [(f"{s}/{ds.get('SOPInstanceUID', k)}", ds) for s, dss in headers.items() for k, ds in enumerate(dss)]
    series, ignored = scan_headers(named)
    reasons: dict[str, set[str]] = {}
    for name, why in ignored:
        reasons.setdefault(name.split("/")[0], set()).add(why)
    left_out = []
    for s, whys in reasons.items():
        first = headers[s][0]
        number = first.get("SeriesNumber")
        label = SeriesInfo(uid=s, number=None if number in (None, "") else int(number),
                           description=str(first.get("SeriesDescription", "") or "")).label()
        left_out.append(f"{label}: {', '.join(sorted(whys))}")
    if not series:
        raise CTSeverityError(f"no CT image series ({', '.join(left_out) or 'no instances'})", f"study {uid}")
    chosen, message = choose_series(series, f"study {uid}", where="the study")
    return chosen, message, left_out


def pull_study(client, uid: str, downloads: str | os.PathLike, out_dir: str | os.PathLike, redact=None,
               keep_identifiers: bool = False, progress: bool = True) -> PacsStudy:
    """Choose the series of a study to grade and retrieve it into ``downloads/<uid>/``.

    A folder that already holds exactly the chosen series' instances is used as it is. One that holds
    something else is replaced, and the study's earlier result in ``out_dir`` is marked incomplete so that it
    is graded again.

    Args:
        client: a DICOMweb client (:func:`pipelines.dicom.dicomweb.connect`).
        uid: the Study Instance UID.
        downloads: the folder of retrieved studies (``DIR/pacs``).
        out_dir: the run's output folder.
        redact: a :class:`~pipelines.dicom.privacy.RedactIdentifiers` to tell the study's identifiers.
        keep_identifiers: log the patient ID with the study.
        progress: show a progress bar while retrieving.

    Raises:
        CTSeverityError: no series fit (reasons listed), or the server failed.
    """
    headers = dicomweb.series_headers(client, uid, modality="CT")
    first = next((h[0] for h in headers.values() if h), None)
    if first is not None:
        ids = patient_identifiers(first)
        if redact is not None:
            redact.add(identifier_strings(ids))
        if keep_identifiers:
            log.info("study %s: patient ID %s, name %s, born %s", uid, ids["id"], ids["name"], ids["birth_date"])
    chosen, message, left_out = choose_study_series(headers, uid)
    for line in left_out:
        log.info("study %s: left out %s", uid, line)
    log.info("study %s: %s (rule: %s)", uid, message or f"one CT series: {chosen.label()} ({chosen.summary()})", RULE)
    if chosen.thickness_mm > THIN_MM:
        log.warning("study %s: the thinnest series fit for grading has %.3g mm slices (thicker than %g mm: "
                    "ground glass is blurred)", uid, chosen.thickness_mm, THIN_MM)
    expected = {str(h.SOPInstanceUID) for h in headers[chosen.uid] if "SOPInstanceUID" in h}
    root = Path(downloads)
    folder = root / uid
    study = PacsStudy(uid, series=chosen)
    if expected and _files_of(folder) == expected:
        log.info("study %s: series already retrieved in %s", uid, folder)
        study.folder = folder
        return study
    part = root / f".{uid}.part"
    shutil.rmtree(part, ignore_errors=True)
    with tqdm(total=len(headers[chosen.uid]), desc=f"retrieving {uid}", unit="image", disable=not progress) as bar:
        dicomweb.retrieve_series(client, uid, chosen.uid, part, progress=bar.update)
    got = _files_of(part)
    if expected and got != expected:
        shutil.rmtree(part, ignore_errors=True)
        raise dicomweb.DicomwebError(f"study {uid}: retrieved {len(got)} instances of series {chosen.uid}, the "
                                     f"metadata lists {len(expected)}")
    if folder.exists():
        shutil.rmtree(folder)
        (Path(out_dir) / uid / "result.json").unlink(missing_ok=True)  # graded on other images: grade again
    os.replace(part, folder)
    study.folder = folder
    return study


def store_study(client, study: PacsStudy, study_dir: str | os.PathLike) -> list[str]:
    """Send a graded study's SEG, SR and overview capture into its study on the server (STOW-RS). A series the
    reader resampled has no SEG (``docs/dicom_outputs.md``): its SR and overview are sent.

    Returns:
        The SOP Instance UIDs stored.

    Raises:
        CTSeverityError: the study has no SR, its outputs belong to another study, or the server refused them.
    """
    sdir = Path(study_dir)
    outputs = json.loads((sdir / "result.json").read_text()).get("outputs", {})
    if "dicom_sr" not in outputs:
        raise CTSeverityError("no DICOM SR to store (see the warnings)", sdir)
    datasets = [pydicom.dcmread(sdir / outputs[k]) for k in STORED_OUTPUTS if k in outputs]
    for ds in datasets:
        if str(ds.StudyInstanceUID) != study.uid:
            raise CTSeverityError(f"{ds.SOPInstanceUID} belongs to study {ds.StudyInstanceUID}, not {study.uid}", sdir)
    stored = dicomweb.store_instances(client, study.uid, datasets)
    names = ", ".join(str(ds.Modality) for ds in datasets)
    log.info("study %s: stored %s (%d instances)", study.uid, names, len(stored))
    return stored


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_pacs(args, config, local_inputs: Sequence[str], url: str) -> int:
    """``ctseverity run`` with a DICOMweb input (see the module notes); returns the exit code.

    Args:
        args: the parsed ``run`` arguments (``out``, ``study``, ``study_date``, ``modality``, ``store``,
            ``keep_identifiers``, ``workers``, ``scheduler``, ``truth``, ``quiet``, ``study_timeout``).
        config: the pipeline settings.
        local_inputs: the run's other inputs (files, folders), graded with the PACS studies.
        url: the ``dicomweb+`` input.

    Raises:
        ValueError: bad options (no study and no query, --store with --no-dicom-out, a bad UID or date).
        CTSeverityError: the server cannot be reached or refused access, or no study could be retrieved.
    """
    from pipelines.batch import run_batch
    from pipelines.commands.run import print_summary

    uids = [check_uid(u) for u in (args.study or [])]
    if not uids and not args.study_date:
        raise ValueError("a DICOMweb input needs --study UID (repeatable) or a query (--study-date, with "
                         "--modality, default CT)")
    if args.store and config.dicom_out is False:
        raise ValueError("--store sends the DICOM SEG and SR: it cannot go with --no-dicom-out")
    if args.study_date:
        dicomweb.check_study_date(args.study_date)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CTSeverityError("exists and is not a folder", out)
    downloads = out / PACS_DIR
    downloads.mkdir(parents=True, exist_ok=True)
    record_path = out / RECORD
    record = _read_record(record_path)
    progress = not args.quiet
    with redacting(enabled=not config.keep_identifiers) as redact:
        client = dicomweb.connect(url)
        root = client._ctseverity_root
        if args.study_date:
            found = dicomweb.find_studies(client, modality=args.modality, study_date=args.study_date)
            log.info("query (modality %s, study date %s): %d studies", args.modality or "any", args.study_date,
                     len(found))
            uids += [u for u in found if u not in uids]
        if not uids:
            raise CTSeverityError(f"no study matches the query (study date {args.study_date}, modality "
                                  f"{args.modality or 'any'})", root)
        studies = []
        for uid in dict.fromkeys(uids):
            try:
                studies.append(pull_study(client, uid, downloads, out, redact, config.keep_identifiers, progress))
            except dicomweb.DicomwebError as exc:
                if exc.server_wide:
                    raise  # the server, not the study: nothing else would work either
                studies.append(PacsStudy(uid, error=exc.reason))
            except CTSeverityError as exc:
                studies.append(PacsStudy(uid, error=exc.reason))
        folders = [str(st.folder) for st in studies if st.folder is not None]
        if not folders and not local_inputs:
            raise CTSeverityError("no study could be retrieved: " + ", ".join(f"{st.uid}: {st.error}"
                                                                              for st in studies), root)
        for st in studies:
            if st.error:
                log.error("study %s: %s", st.uid, st.error)
        summary = run_batch([*local_inputs, *folders], out, config, workers=args.workers, scheduler=args.scheduler,
                            truth=args.truth, progress=progress, study_timeout=args.study_timeout)
        print_summary(summary, args.truth)
        status = {str(r["study"]): r["status"] for r in summary.rows}
        if args.store:
            for st in studies:
                if st.folder is None or status.get(st.uid) != "ok":
                    continue
                before = (record.get("studies") or {}).get(st.uid) or {}
                try:
                    st.stored = _store_once(client, st, out / st.uid, before, root)
                except CTSeverityError as exc:
                    st.error = f"not stored: {exc.reason}"
                    log.error("study %s: %s", st.uid, st.error)
        _write_record(record_path, record, root, studies, status)
    for st in studies:
        if st.error:
            print(f"error: {st.uid}: {st.error}")
        elif st.stored:
            print(f"stored: {st.uid}: {len(st.stored)} instances into {root}")
    return 1 if summary.n_failed or any(st.error for st in studies) else 0


def _store_once(client, study: PacsStudy, study_dir: Path, before: dict, root: str) -> list[str]:
    """Store a study's outputs unless the record says these very instances are on this server already."""
    outputs = json.loads((study_dir / "result.json").read_text()).get("outputs", {})
    uids = sorted(str(pydicom.dcmread(study_dir / outputs[k], stop_before_pixels=True).SOPInstanceUID)
                  for k in STORED_OUTPUTS if k in outputs)
    if before.get("server") == root and sorted(before.get("stored") or []) == uids and uids:
        log.info("study %s: its outputs are stored on %s already", study.uid, root)
        return list(before["stored"])
    return store_study(client, study, study_dir)


def _write_record(path: Path, record: dict, root: str, studies: Sequence[PacsStudy], status: dict) -> None:
    """``DIR/pacs.json``: per study the series graded, the status and what was stored where (no identifiers)."""
    entries = dict(record.get("studies") or {})
    for st in studies:
        entry = dict(entries.get(st.uid) or {})
        if entry.get("server") != root:
            entry.pop("stored", None)
        entry.update(server=root, status=status.get(st.uid, "not retrieved"), error=st.error or None)
        if st.series is not None:
            entry.update(series=st.series.uid, series_number=st.series.number, slices=st.series.n_slices,
                         slice_thickness_mm=st.series.thickness_mm, folder=f"{PACS_DIR}/{st.uid}")
        if st.stored:
            entry["stored"] = list(st.stored)
        entries[st.uid] = entry
    atomic_write_text(path, json.dumps({"rule": RULE, "studies": entries}, indent=2))
