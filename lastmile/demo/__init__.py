"""The demo clinic: stand-ins for the reading center, the county FHIR platform and devices."""
