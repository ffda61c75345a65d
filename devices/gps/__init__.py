"""GNSS receivers speaking NMEA 0183: sentences, stream reassembly, fixes with quality (pure)."""

from devices.gps.fix import Fix, FixMode
from devices.gps.nmea import ChecksumError, NmeaError, parse_sentence
from devices.gps.stream import BadSentence, FixAssembler, NmeaStreamDecoder, decode_nmea

__all__ = [
    "BadSentence",
    "ChecksumError",
    "Fix",
    "FixAssembler",
    "FixMode",
    "NmeaError",
    "NmeaStreamDecoder",
    "decode_nmea",
    "parse_sentence",
]
