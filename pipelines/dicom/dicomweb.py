"""DICOMweb access to a PACS or research archive (dicomweb-client): find studies (QIDO-RS), read series headers
and retrieve a series (WADO-RS), store results (STOW-RS).

A server is named as a ``ctseverity run`` input by its DICOMweb root with ``dicomweb+`` in front of the scheme:
``dicomweb+http://pacs.example.org:8042/dicom-web``. Credentials never go on the command line (a URL with a
user or password is refused): they come from the environment (:data:`ENV_USER` and :data:`ENV_PASSWORD` for
HTTP basic authentication, or :data:`ENV_TOKEN` for a bearer token), else from the netrc file (``$NETRC`` or
``~/.netrc``) entry of the server's host. See ``docs/pacs.md``.

Example:
    >>> client = connect("dicomweb+http://127.0.0.1:8042/dicom-web")  # doctest: +SKIP
    >>> find_studies(client, modality="CT", study_date="20200301-20200331")  # doctest: +SKIP
    ['1.2.826.0.1.3680043.8.498.1', ...]
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydicom.dataset import Dataset

from monai_ext.errors import CTSeverityError

__all__ = ["SCHEME_PREFIX", "ENV_USER", "ENV_PASSWORD", "ENV_TOKEN", "is_dicomweb_url", "server_url",
           "credentials", "connect", "find_studies", "series_headers", "retrieve_series", "store_instances",
           "check_study_date", "DicomwebError"]

log = logging.getLogger(__name__)

#: what marks an input as a DICOMweb server
SCHEME_PREFIX = "dicomweb+"

#: environment variables with the credentials
ENV_USER = "CTSEVERITY_DICOMWEB_USER"
ENV_PASSWORD = "CTSEVERITY_DICOMWEB_PASSWORD"
ENV_TOKEN = "CTSEVERITY_DICOMWEB_TOKEN"

#: seconds to wait for the server to connect and to answer
TIMEOUT = (10, 300)

#: the header attributes the series choice needs (:func:`monai_ext.io.dicom_select.scan_headers`): type, SOP
#: class and instance, modality, description, patient, series, kernel, thickness, position, orientation, size,
#: frames and the functional groups of multi-frame images
_HEADER_TAGS = ("00080008", "00080016", "00080018", "00080060", "0008103E", "00100010", "00100020", "00100030",
                "0020000E", "00200011", "00181210", "00180050", "00200032", "00200037", "00280008", "00280010",
                "00280011", "52009229", "52009230")


class DicomwebError(CTSeverityError):
    """The DICOMweb server cannot be reached, refused a request, or answered something unusable.

    Attributes:
        server_wide: the failure concerns the server, not one study (unreachable, access refused).
    """

    def __init__(self, message: str, path: object | None = None, server_wide: bool = False) -> None:
        super().__init__(message, path)
        self.server_wide = server_wide


def is_dicomweb_url(text: str | os.PathLike) -> bool:
    """Whether an input names a DICOMweb server (``dicomweb+http://...`` or ``dicomweb+https://...``)."""
    return str(text).lower().startswith((f"{SCHEME_PREFIX}http://", f"{SCHEME_PREFIX}https://"))


def server_url(text: str) -> str:
    """The server's DICOMweb root (``http(s)://host[:port]/path``) of a ``dicomweb+`` input.

    Raises:
        ValueError: not a DICOMweb input, no host, a query or fragment, or credentials in the URL (they
            belong in the environment or a netrc file; the message does not repeat them).
    """
    if not is_dicomweb_url(text):
        raise ValueError(f"not a DICOMweb server: {text!r} (expected dicomweb+http://host:port/path)")
    parts = urlsplit(str(text)[len(SCHEME_PREFIX):])
    if parts.username is not None or parts.password is not None:
        safe = urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
        raise ValueError(f"{SCHEME_PREFIX}{safe}: credentials do not go into the URL: set {ENV_USER} and "
                         f"{ENV_PASSWORD} (or {ENV_TOKEN}), or a netrc entry for the host")
    if not parts.hostname:
        raise ValueError(f"{text}: no host in the DICOMweb URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{text}: a DICOMweb root has no query or fragment")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def credentials(url: str, environ: dict | None = None) -> tuple[object | None, str]:
    """The credentials for ``url`` and where they came from (for the log; the secret itself is never logged).

    Order: :data:`ENV_TOKEN` (a bearer token), then :data:`ENV_USER` with :data:`ENV_PASSWORD` (HTTP basic),
    then the netrc file (``$NETRC``, else ``~/.netrc``) entry of the URL's host (or its ``default`` entry).

    Returns:
        ``(auth, source)``: a ``requests`` auth object or ``None`` (no credentials), and e.g.
        ``"$CTSEVERITY_DICOMWEB_USER"`` or ``"netrc /home/me/.netrc"``.

    Raises:
        ValueError: a user without a password (or the reverse) in the environment, or a netrc file that
            cannot be parsed (named, without its content).
    """
    import requests.auth

    env = os.environ if environ is None else environ
    token = env.get(ENV_TOKEN)
    if token:
        return _BearerAuth(token), f"${ENV_TOKEN}"
    user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
    if bool(user) != bool(password):
        raise ValueError(f"set both {ENV_USER} and {ENV_PASSWORD}, or neither")
    if user:
        return requests.auth.HTTPBasicAuth(user, password), f"${ENV_USER}"
    path = Path(env["NETRC"]) if env.get("NETRC") else Path.home() / ".netrc"
    if not path.is_file():
        return None, "none"
    try:
        entry = netrc.netrc(str(path)).authenticators(urlsplit(url).hostname or "")
    except (netrc.NetrcParseError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the netrc file ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not entry or not entry[0]:
        return None, "none"
    return requests.auth.HTTPBasicAuth(entry[0], entry[2] or ""), f"netrc {path}"


class _BearerAuth:
    """``Authorization: Bearer <token>`` on every request (a ``requests`` auth callable)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:  # never the token
        return "BearerAuth(***)"


def connect(url: str, environ: dict | None = None):
    """A ``dicomweb_client.DICOMwebClient`` for a ``dicomweb+`` input, with the credentials of
    :func:`credentials`.

    Raises:
        ValueError: a bad URL or bad credential settings.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    root = server_url(url)
    auth, source = credentials(root, environ)
    session = requests.Session()
    session.auth = auth
    log.info("DICOMweb server %s (credentials: %s)", root, source)
    client = DICOMwebClient(root, session=session, timeout=TIMEOUT)
    client._ctseverity_root = root  # for messages
    return client


def _call(client, what: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the server's refusals and network failures as :class:`DicomwebError`."""
    import requests

    root = getattr(client, "_ctseverity_root", "the DICOMweb server")
    try:
        return fn(*args, **kwargs)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = ""
        if status in (401, 403):
            hint = (f": access refused; set {ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN}) or a netrc entry for "
                    "the host")
        raise DicomwebError(f"{what}: HTTP {status}{hint}", root, server_wide=bool(hint)) from None
    except requests.RequestException as exc:
        raise DicomwebError(f"{what}: {type(exc).__name__}: {_first_line(exc)}", root, server_wide=True) from None


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


#: results asked for per QIDO-RS request
PAGE = 200


def _search_all(client, what: str, fn: Callable, **kwargs) -> list[dict]:
    """Every result of a QIDO-RS search, a page (:data:`PAGE`) at a time. Stops at a page shorter than asked for,
    or one that brings nothing new (a server that ignores ``offset`` would otherwise be asked forever)."""
    results: list[dict] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = _call(client, what, fn, limit=PAGE, offset=offset, **kwargs) or []
        new = [r for r in page if json.dumps(r, sort_keys=True) not in seen]
        seen.update(json.dumps(r, sort_keys=True) for r in new)
        results += new
        if len(page) < PAGE or not new:
            return results
        offset += len(page)


_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


def check_study_date(value: str) -> str:
    """A QIDO study date: ``YYYYMMDD``, or a range ``YYYYMMDD-YYYYMMDD``, ``YYYYMMDD-`` (from) or ``-YYYYMMDD``
    (until); ``YYYY-MM-DD`` dates are accepted too.

    Raises:
        ValueError: anything else.
    """
    text = str(value).strip()
    compact = re.sub(r"(\d{4})-(\d{2})-(\d{2})", r"\1\2\3", text)
    m = _DATE.match(compact)
    if not m or compact in ("", "-"):
        raise ValueError(f"--study-date {value!r}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
    return compact


def find_studies(client, modality: str | None = "CT", study_date: str | None = None) -> list[str]:
    """The Study Instance UIDs matching a QIDO-RS query: a modality in the study and a study date (range).

    Args:
        client: a client from :func:`connect`.
        modality: Modalities In Study to match (``None``: any).
        study_date: :func:`check_study_date` syntax (``None``: any date).

    Raises:
        DicomwebError: the query failed.
    """
    filters = {}
    if modality:
        filters["ModalitiesInStudy"] = modality
    if study_date:
        filters["StudyDate"] = check_study_date(study_date)
    found = _search_all(client, "study query (QIDO-RS)", client.search_for_studies, search_filters=filters,
                        fields=["StudyInstanceUID"])
    from pipelines.dicom.pacs import check_uid

    uids = []
    for item in found:
        value = (item.get("0020000D") or {}).get("Value") or []
        if not value:
            continue
        try:  # the UID names the study's folders: a server's '../x' or '/tmp/x' must not
            uid = check_uid(str(value[0]))
        except ValueError:
            log.error("study query: the server answered %r, not a Study Instance UID (digits and dots): skipped",
                      str(value[0])[:80])
            continue
        if uid not in uids:
            uids.append(uid)
    return uids


def _dataset(item: dict) -> Dataset:
    """A header of WADO-RS metadata (DICOM JSON) with the attributes the series choice needs; an empty Pixel
    Data element stands for the pixel data of an image (metadata lists its Pixel Data, or at least its Rows:
    servers such as Orthanc leave Pixel Data out of the metadata)."""
    kept = {tag: v for tag, v in item.items() if tag in _HEADER_TAGS and "BulkDataURI" not in v
            and "InlineBinary" not in v}
    ds = Dataset.from_json(kept)
    if "7FE00010" in item or "00280010" in item:
        ds.PixelData = b""
    return ds


def series_headers(client, study_uid: str, modality: str | None = "CT") -> dict[str, list[Dataset]]:
    """The headers (no pixel data) of every series of a study, optionally of one modality only.

    Args:
        client: a client from :func:`connect`.
        study_uid: the Study Instance UID.
        modality: the series modality to keep (``None``: all).

    Returns:
        Series Instance UID -> one header per instance (type, SOP class, modality, orientation, position,
        size, thickness, number, description, patient identifiers).

    Raises:
        DicomwebError: the study is not on the server, or a request failed.
    """
    filters = {"Modality": modality} if modality else None
    found = _search_all(client, f"series query of study {study_uid}", client.search_for_series,
                        study_instance_uid=study_uid, search_filters=filters)
    if not found:
        what = f"no {modality} series" if modality else "no series"
        raise DicomwebError(f"study {study_uid}: {what} on the server")
    out: dict[str, list[Dataset]] = {}
    for item in found:
        uid = str(((item.get("0020000E") or {}).get("Value") or [""])[0])
        if not uid:
            continue
        meta = _call(client, f"metadata of series {uid}", client.retrieve_series_metadata,
                     study_instance_uid=study_uid, series_instance_uid=uid)
        out[uid] = [_dataset(m) for m in meta]
    return out


def retrieve_series(client, study_uid: str, series_uid: str, folder: str | os.PathLike,
                    progress: Callable[[int], None] | None = None) -> list[Path]:
    """Retrieve a series (WADO-RS, in the transfer syntax the server stores) into ``folder`` as
    ``<SOPInstanceUID>.dcm``, one file per instance, each written under a temporary name first.

    Args:
        progress: called with 1 after each instance.

    Raises:
        DicomwebError: a request failed or the series is empty.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    from pipelines.dicom.pacs import check_uid

    def fetch() -> None:
        for ds in client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),)):
            try:  # the UID names the file: a server's '../x' must not
                name = check_uid(str(ds.get("SOPInstanceUID", "")))
            except ValueError:
                raise DicomwebError(f"series {series_uid}: the server sent an instance whose SOP Instance UID "
                                    f"{str(ds.get('SOPInstanceUID', ''))[:80]!r} is not a DICOM UID") from None
            path = out / f"{name}.dcm"
            tmp = out / f".{path.name}.part"
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, path)
            paths.append(path)
            if progress is not None:
                progress(1)

    _call(client, f"retrieval of series {series_uid}", fetch)
    if not paths:
        raise DicomwebError(f"series {series_uid} of study {study_uid}: the server sent no instance")
    return paths


def store_instances(client, study_uid: str, datasets: Sequence[Dataset]) -> list[str]:
    """Store instances in a study (STOW-RS) and return the SOP Instance UIDs the server accepted.

    Raises:
        DicomwebError: the request failed, or the server refused an instance (its failure reason given).
    """
    response = _call(client, f"store (STOW-RS) into study {study_uid}", client.store_instances,
                     datasets=list(datasets), study_instance_uid=study_uid)
    failed = list(getattr(response, "FailedSOPSequence", []) or []) if response is not None else []
    if failed:
        reasons = ", ".join(f"{f.get('ReferencedSOPInstanceUID', '?')} (failure reason "
                            f"{f.get('FailureReason', '?')})" for f in failed)
        raise DicomwebError(f"store into study {study_uid}: the server refused {reasons}")
    accepted = [str(r.ReferencedSOPInstanceUID) for r in getattr(response, "ReferencedSOPSequence", []) or []]
    return accepted or [str(ds.SOPInstanceUID) for ds in datasets]
