"""ECG recordings and the file formats carts deliver them in."""

from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording

__all__ = ["STANDARD_12_LEADS", "EcgRecording"]
