"""Clinic state: the clinic database, the current patient and doctor, held observations, devices."""
