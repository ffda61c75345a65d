"""Store-and-forward: the durable outbox, pure builders (DICOM, FHIR) and thin senders."""
