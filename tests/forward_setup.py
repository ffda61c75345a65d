"""A gateway set up to forward ECGs to a reading center on loopback, and that reading center's side of
storage commitment: a real pynetdicom peer sending the gateway an N-EVENT-REPORT."""

from __future__ import annotations

from pathlib import Path

from lastmile.config import Config
from tests.peers import free_port


def make_config(tmp_path: Path, port: int, called_ae: str, **rc_overrides) -> Config:
    c = Config()
    c.gateway.data_dir = str(tmp_path / "data")
    rc = c.reading_center
    rc.host, rc.port, rc.called_ae, rc.calling_ae = "127.0.0.1", port, called_ae, "CLINIC01"
    rc.listen_port = rc_overrides.pop("listen_port", free_port())
    rc.listen_host = "127.0.0.1"
    rc.associations, rc.batch_size, rc.timeout_s, rc.commitment_timeout_s = 2, 5, 10.0, 10.0
    for k, v in rc_overrides.items():
        setattr(rc, k, v)
    c.outbox.backoff_base_s, c.outbox.backoff_max_s, c.outbox.min_free_mb = 0.1, 0.5, 1
    c.outbox.config_fault_retry_s = 0.5
    c.ecg.re_record_hold_s = 0  # the synthetic 2 s ECGs are re-record cases: forwarding is the subject here
    return c


def send_report(
    port: int,
    txn: str,
    refs: list[tuple[str, str]],
    *,
    calling_ae: str,
    called_ae: str = "CLINIC01",
    failed: list[tuple[str, str]] = (),
    reason: int = 0x0110,
    source: str | None = None,
) -> str | int:
    """A real pynetdicom peer sending one Storage Commitment N-EVENT-REPORT to the gateway's
    listener: the report's status, or how the association failed ("rejected", "closed")."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_context, build_role
    from pynetdicom.sop_class import StorageCommitmentPushModel

    from lastmile.demo.reading_center import commitment_item
    from uploader.dicom_association import STORAGE_COMMITMENT_INSTANCE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(
        "127.0.0.1",
        port,
        [build_context(StorageCommitmentPushModel)],
        ae_title=called_ae,
        ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
        bind_address=(source, 0) if source else None,
    )
    if assoc.is_rejected:
        return "rejected"
    if not assoc.is_established:
        return "closed"
    info = Dataset()
    info.TransactionUID = txn
    if refs:
        info.ReferencedSOPSequence = [commitment_item(c, u) for c, u in refs]
    if failed:
        info.FailedSOPSequence = [commitment_item(c, u, reason) for c, u in failed]
    status, _ = assoc.send_n_event_report(
        info, 2 if failed else 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
    )
    assoc.release()
    return int(status.get("Status", -1))
