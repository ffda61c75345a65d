"""What the DICOM ECG tests build objects from, and how they read them back: the station, patient,
cart and UIDs the builder is given, a recording of given (or random) samples, the stored samples."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.waveforms.numpy_handler import multiplex_array

from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording
from devices.identity import DeviceIdentity, Patient, TimeSource
from uploader.dicom_ecg import EcgStudyUids, StationInfo

UIDS = EcgStudyUids(study_uid="2.25.1001", series_uid="2.25.1002", sop_instance_uid="2.25.1003")
STATION = StationInfo(station_name="gw-kibera-01", institution="Kibera Health Centre")
NAIROBI = dt.timezone(dt.timedelta(hours=3))
ACQUIRED = dt.datetime(2024, 5, 1, 9, 30, 0, 250000, tzinfo=NAIROBI)
CART = DeviceIdentity(manufacturer="Acme Cardio", model="Cart 5", serial="SN-0042", software_version="2.1.7")
PATIENT = Patient(
    patient_id="KE-123456",
    name="Mwangi^Wanjirũ",
    birth_date=dt.date(1980, 1, 2),
    sex="F",
    issuer="Nairobi County Register",
)


def recording(samples: np.ndarray, leads: tuple[str, ...] = STANDARD_12_LEADS, **changes: object) -> EcgRecording:
    """A 500 Hz recording of `samples` from the Acme cart, of PATIENT, with `changes` to any field."""
    fields = dict(
        samples=samples,
        lead_names=leads[: samples.shape[0]],
        sampling_rate_hz=500.0,
        uv_per_unit=2.5,
        acquired_at=ACQUIRED,
        time_source=TimeSource.DEVICE_CLOCK,
        device=CART,
        patient=PATIENT,
        source_format="scp",
    )
    fields.update(changes)
    return EcgRecording(**fields)


def synthetic(leads: int = 12, n: int = 2500, seed: int = 7, peak: int = 2000) -> np.ndarray:
    """Random samples (leads, n) within +-peak, the same for the same seed."""
    return np.random.default_rng(seed).integers(-peak, peak + 1, (leads, n), dtype=np.int32)


def read(data: bytes) -> Dataset:
    """A DICOM object read back from its bytes."""
    return pydicom.dcmread(io.BytesIO(data))


def raw_samples(ds: Dataset) -> np.ndarray:
    """The stored integers (leads, samples), before sensitivity is applied."""
    return multiplex_array(ds, 0, as_raw=True).T
