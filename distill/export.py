"""Stage: turn a finished run folder into a share (``distill export``).

Public entry point: :func:`export_share`. It reads ``RUNDIR/synthetic.h5`` and
``RUNDIR/audit.json``, builds the share with :func:`distill.runshare.share_from_synset`
(which scrubs the provenance) and writes it with :func:`distill.formats.share.write_share`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import DistillError, FormatError
from .formats.audit import AUDIT_FILE, AuditDocument, read_audit
from .formats.plain import write_plain
from .formats.provenance import METHOD_HOME_ONLY, METHOD_KEYS  # noqa: F401 (re-exported)
from .formats.share import write_share
from .formats.share_schema import AUDIT_OUTSIDE, Attr
from .formats.synset import read_synset
from .io import output_lock, remove_stale_temps
from .lifecycle import stage
from .privacy.remedies import remedy_text
from .runshare import is_plain, scrub, scrub_sentence, share_from_synset  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def audit_status(rundir: Path) -> tuple[str, AuditDocument | None]:
    """(status, audit document or None) with status passed | failed | missing | invalid."""
    if not (rundir / AUDIT_FILE).exists():
        return "missing", None
    try:
        audit = read_audit(rundir)
    except (FormatError, OSError):
        return "invalid", None
    if not isinstance(audit.passed, bool):
        return "invalid", None
    return ("passed" if audit.passed else "failed"), audit


def failed_audit_message(rundir: Path, audit: AuditDocument) -> str:
    """Why the gate refuses (the audit's own reasons, with interval and baseline) and what to change."""
    why = "".join(f"\n  - {r}" for r in audit.sections().reasons())
    return (f"The privacy audit of {rundir} failed, so this set may leak patients:{why}\n{remedy_text(rundir)}\n"
            "Or pass --force to export it anyway (the share records that).")


def _privacy(rundir: Path, force: bool) -> dict:
    status, audit = audit_status(rundir)
    if status != "passed" and not force:
        if status == "missing":
            raise DistillError(f"{rundir} has no privacy audit; run 'distill audit {rundir}' first, "
                               "or pass --force to export without one.")
        if status == "failed":
            raise DistillError(failed_audit_message(rundir, audit))
        raise DistillError(f"The privacy audit in {rundir} is not readable; run 'distill audit' again, "
                           "or pass --force to export without one.")
    if status != "passed":
        log.warning("Exporting with a %s privacy audit because of --force; the share records this.", status)
    created = str(audit.created) if audit is not None else ""
    # Only that an audit ran and its verdict travel: its figures are computed from the private images,
    # so they stay in the run folder (and on the in-hospital review page). Share format 1.1.
    return {Attr.AUDIT_STATUS: status, Attr.FORCED: status != "passed", Attr.SUMMARY: {},
            Attr.STATEMENT: audit_statement(status),
            Attr.AUDIT_CREATED: created if is_plain(created) else ""}


def audit_statement(status: str) -> str:
    """What a share says about its audit: whether one ran, the verdict, and that the verdict is outside the guarantee."""
    if status in ("missing", "invalid"):
        return f"No readable privacy audit was recorded (status: {status}); the share was exported with --force."
    return f"An empirical privacy audit was run; its verdict: {status}. {AUDIT_OUTSIDE}"


def export_share(rundir: str | os.PathLike, out: str | os.PathLike, *, license: str = "CC-BY-4.0",
                 description: str = "", citation: str = "", force: bool = False, overwrite: bool = False,
                 format: str = "h5") -> Path:
    """Write the share of the run in ``rundir`` to ``out`` (atomically); returns ``out``.

    Refuses unless ``rundir/audit.json`` records a passed audit, or ``force`` is set,
    in which case the share records the override. Refuses an existing ``out`` unless
    ``overwrite``; one export at a time writes ``out`` (a lock file beside it).
    ``format``: h5 (the share), or its plain forms folder / npz (:mod:`distill.formats.plain`).
    """
    rundir, out = Path(rundir), Path(out)
    if not rundir.is_dir():
        raise DistillError(f"Run folder {rundir} does not exist.")
    if format != "h5":
        if format == "npz" and out.exists() and not overwrite:
            raise DistillError(f"{out} already exists; pass --overwrite to replace it or choose another --out.")
        share = share_from_synset(read_synset(rundir), _privacy(rundir, force), license=license,
                                  description=description, citation=citation)
        return write_plain(share, out, format)
    if out.is_dir():
        raise DistillError(f"{out} is a folder; give the share's file name, e.g. {out / 'share.h5'}.")
    if out.exists() and not overwrite:
        raise DistillError(f"{out} already exists; pass --overwrite to replace it or choose another --out.")
    synset = read_synset(rundir)
    privacy = _privacy(rundir, force)
    share = share_from_synset(synset, privacy, license=license, description=description, citation=citation)
    with stage(lock=output_lock(out.parent, f".{out.name}.lock")):  # one export at a time writes out
        remove_stale_temps(out.parent, out.name)
        if out.exists() and not overwrite:  # another export finished while this one was reading
            raise DistillError(f"{out} already exists; pass --overwrite to replace it or choose another --out.")
        return write_share(out, share)
