"""Every flag a reading or a home visit can carry, in the doctor's words: the one place.

A reading's flags come from its device (Bluetooth status bits and sample/site/context codes in
devices/ble/*, the plausibility screen's "implausible-<code>", the stored-record mark in
devices/identity.py); a home visit's from lastmile/visits/book.py. The pages show each as a
short badge: a warning (amber) when it says something about the value the doctor must weigh or
act on, a plain note when it only says where or how the reading was taken. Some are not the
doctor's business and are not shown (NOT_SHOWN says why for each). tests/test_flag_words.py
walks every flag the device code can emit and fails on one this module does not word.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from devices.identity import STORED_TIME_UNKNOWN
from devices.plausibility import FLAG_PREFIX as IMPLAUSIBLE_PREFIX
from lastmile.console.i18n import N_, Localizer

_DEVICE_FAULT = N_("device fault: measure again")
_CONTROL_SOLUTION = N_("control solution, not the patient's blood")

# Something about the value (or the visit) to weigh or act on: an amber badge.
WARNINGS: dict[str, str] = {
    # home visits (lastmile/visits/book.py)
    "no-fix": N_("no GPS position"),
    "poor-accuracy": N_("GPS position inaccurate"),
    "stale-fix": N_("GPS position out of date"),
    "outside-radius": N_("far from the household"),
    "unknown-household": N_("household not in the register"),
    "no-household": N_("no household given"),
    "impossible-jump": N_("impossible jump in the track"),
    "time-disagreement": N_("GPS and clock disagree"),
    "provisional-time": N_("time was not known at the start"),
    "start-time-lost": N_("start time lost in a restart"),
    "end-time-lost": N_("end time lost in a restart"),
    # blood pressure (STATUS_BITS, PULSE_RATE_RANGE)
    "body-movement": N_("body movement"),
    "cuff-too-loose": N_("cuff too loose"),
    "irregular-pulse": N_("irregular pulse"),
    "improper-measurement-position": N_("wrong measuring position"),
    "pulse-rate-above-range": N_("pulse too fast for the device to measure"),
    "pulse-rate-below-range": N_("pulse too slow for the device to measure"),
    # glucose meter (SENSOR_STATUS_BITS; sample type or site "control-solution")
    "battery-low": N_("device battery low"),
    "sensor-malfunction": _DEVICE_FAULT,
    "sample-size-insufficient": N_("too little blood on the strip"),
    "strip-insertion-error": N_("strip not put in properly"),
    "strip-type-incorrect": N_("wrong kind of test strip"),
    "result-above-device-range": N_("higher than the device can measure"),
    "result-below-device-range": N_("lower than the device can measure"),
    "sensor-temperature-too-high": N_("too hot for the device"),
    "sensor-temperature-too-low": N_("too cold for the device"),
    "strip-pulled-too-soon": N_("strip pulled out too soon"),
    "general-device-fault": _DEVICE_FAULT,
    "time-fault": N_("device clock wrong"),
    "control-solution": _CONTROL_SOLUTION,
    "sample-control-solution": _CONTROL_SOLUTION,
    "site-control-solution": _CONTROL_SOLUTION,
    # pulse oximeter (MEASUREMENT_STATUS_BITS, DEVICE_SENSOR_STATUS_BITS, spot-check flags)
    "measurement-ongoing": N_("measurement not finished"),
    "early-estimated-data": N_("first estimate, not the final value"),
    "data-for-demonstration": N_("demonstration value, not the patient's"),
    "data-for-testing": N_("test value, not the patient's"),
    "calibration-ongoing": N_("device was calibrating"),
    "measurement-unavailable": N_("nothing measured"),
    "questionable-measurement": N_("doubtful value: measure again"),
    "invalid-measurement": N_("invalid value: measure again"),
    "equipment-malfunction": _DEVICE_FAULT,
    "signal-processing-irregularity": N_("signal unclear"),
    "inadequate-signal": N_("signal too weak"),
    "poor-signal": N_("poor signal"),
    "low-perfusion": N_("weak blood flow in the finger"),
    "erratic-signal": N_("unsteady signal"),
    "nonpulsatile-signal": N_("no pulse found"),
    "questionable-pulse": N_("doubtful pulse"),
    "signal-analysis-ongoing": N_("device still analysing"),
    "sensor-interference": N_("probe disturbed"),
    "sensor-unconnected-to-user": N_("probe not on the patient"),
    "unknown-sensor-connected": N_("unknown probe"),
    "sensor-displaced": N_("probe moved"),
    "sensor-malfunctioning": N_("probe fault"),
    "sensor-disconnected": N_("probe not plugged in"),
    "device-clock-not-set": N_("device clock not set"),
    # scale
    "measurement-unsuccessful": N_("measurement failed: measure again"),
    # a record from a device's memory whose own time could not be used
    STORED_TIME_UNKNOWN: N_("old record from the device's memory: time not known"),
}

# Where or how the reading was taken: a plain badge.
NOTES: dict[str, str] = {
    # glucose sample type ("sample-" + SAMPLE_TYPES)
    "sample-capillary-whole-blood": N_("fingertip whole blood"),
    "sample-capillary-plasma": N_("fingertip plasma"),
    "sample-venous-whole-blood": N_("venous whole blood"),
    "sample-venous-plasma": N_("venous plasma"),
    "sample-arterial-whole-blood": N_("arterial whole blood"),
    "sample-arterial-plasma": N_("arterial plasma"),
    "sample-undetermined-whole-blood": N_("whole blood"),
    "sample-undetermined-plasma": N_("plasma"),
    "sample-interstitial-fluid": N_("tissue fluid (sensor under the skin)"),
    # glucose sample location and thermometer site ("site-" + SAMPLE_LOCATIONS / TEMPERATURE_TYPES)
    "site-finger": N_("finger"),
    "site-alternate-site-test": N_("not from the fingertip"),
    "site-earlobe": N_("earlobe"),
    "site-armpit": N_("armpit"),
    "site-ear": N_("ear"),
    "site-gastro-intestinal-tract": N_("stomach or gut"),
    "site-mouth": N_("mouth"),
    "site-rectum": N_("rectal"),
    "site-toe": N_("toe"),
    "site-tympanum": N_("ear drum"),
    # glucose context (devices/ble/glucose.py decode_glucose_context)
    "carbohydrate-breakfast": N_("ate: breakfast"),
    "carbohydrate-lunch": N_("ate: lunch"),
    "carbohydrate-dinner": N_("ate: dinner"),
    "carbohydrate-snack": N_("ate: snack"),
    "carbohydrate-drink": N_("ate: drink"),
    "carbohydrate-supper": N_("ate: late supper"),
    "carbohydrate-brunch": N_("ate: late breakfast"),
    "meal-preprandial": N_("before a meal"),
    "meal-postprandial": N_("after a meal"),
    "meal-fasting": N_("fasting"),
    "meal-casual": N_("any time of day"),
    "meal-bedtime": N_("at bedtime"),
    "tester-self": N_("measured by the patient"),
    "tester-health-care-professional": N_("measured by a health worker"),
    "tester-lab-test": N_("laboratory test"),
    "health-minor-health-issues": N_("feeling a little unwell"),
    "health-major-health-issues": N_("feeling very unwell"),
    "health-during-menses": N_("during her period"),
    "health-under-stress": N_("under stress"),
    "health-no-health-issues": N_("feeling well"),
    "medication-rapid-acting-insulin": N_("rapid-acting insulin"),
    "medication-short-acting-insulin": N_("short-acting insulin"),
    "medication-intermediate-acting-insulin": N_("intermediate-acting insulin"),
    "medication-long-acting-insulin": N_("long-acting insulin"),
    "medication-pre-mixed-insulin": N_("premixed insulin"),
    "exercise-duration-overrun": N_("exercised for a very long time"),
}

# Flags a device can send that are no badge, and why.
NOT_SHOWN: dict[str, str] = {
    "data-from-storage": "a stored record is said another way: its time, or STORED_TIME_UNKNOWN and the hold",
    "validated-data": "the device says the value is good: nothing to weigh",
    "fully-qualified-data": "the device says the value is good: nothing to weigh",
    "extended-display-update-ongoing": "the device's screen updating: nothing about the value",
    "pulse-rate-range-reserved": "a reserved code: the device says nothing the standard defines",
    "site-body": "a thermometer's 'body' names no site",
    "tester-not-available": "the meter does not know who measured: nothing to say",
    "health-not-available": "the meter does not know how the patient felt: nothing to say",
}
# "implausible-<code>": the value's own text already says "impossible value (the device said ...)".
NOT_SHOWN_PREFIXES: tuple[str, ...] = (IMPLAUSIBLE_PREFIX,)

# A flag none of the tables above knows (a newer device or firmware): said as a device's mark, the
# code itself only in the badge's title, for the technician - never English on a Chinese page.
UNKNOWN_FLAG = N_("the device marked this reading")


@dataclass(frozen=True, slots=True)
class FlagBadge:
    text: str  # in the page's language
    warn: bool  # amber: about the value; plain: where or how it was taken
    code: str  # the flag as stored, for the technician (the badge's title)


def shown(flag: str) -> bool:
    return flag not in NOT_SHOWN and not flag.startswith(NOT_SHOWN_PREFIXES)


def flag_badge(flag: str, localizer: Localizer) -> FlagBadge:
    """One flag's badge, whether or not it is shown."""
    if flag in WARNINGS:
        return FlagBadge(localizer.gettext(WARNINGS[flag]), True, flag)
    if flag in NOTES:
        return FlagBadge(localizer.gettext(NOTES[flag]), False, flag)
    return FlagBadge(localizer.gettext(UNKNOWN_FLAG), True, flag)


def flag_badges(flags: Iterable[str], localizer: Localizer) -> list[FlagBadge]:
    """The badges a row shows for its flags, in their order: those not the doctor's business left
    out, each text once (a control solution is said by its sample type, its site and its own flag)."""
    badges: dict[str, FlagBadge] = {}
    for flag in flags:
        if shown(flag):
            badge = flag_badge(flag, localizer)
            badges.setdefault(badge.text, badge)
    return list(badges.values())
