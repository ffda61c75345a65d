"""Which returned reports are critical results (危急值) the doctor has not acknowledged: one SQL
condition on clinic.db's `reports`, for the report store (`lastmile doctor`, the alerts, the
console) and the metrics exporter, which reads clinic.db by plain SQL without the store (no
sqlite_utils in its process): both count the same reports."""

# a version replaced is no longer shown anywhere: nothing the doctor could open and read
UNACKNOWLEDGED_CRITICAL = "critical IS NOT NULL AND acknowledged_at IS NULL AND superseded_by IS NULL"
