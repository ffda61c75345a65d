"""DICOM ECG builder: the edges the mutation score found untested (issue 20)."""
