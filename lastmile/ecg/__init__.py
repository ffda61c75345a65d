"""ECG room: intake, quality hold and preview."""
