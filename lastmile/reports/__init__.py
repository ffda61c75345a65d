"""Reports from the county reading center: what we sent, what came back, critical alerts."""
