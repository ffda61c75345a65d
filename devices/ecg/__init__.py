"""ECG recordings and the file formats carts deliver them in."""

from devices.ecg.recording import EcgRecording, STANDARD_12_LEADS

__all__ = ["EcgRecording", "STANDARD_12_LEADS"]
