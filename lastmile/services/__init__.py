"""The long-running services systemd starts (acquire, forward) and what they share: the runtime
loop with watchdog and reload, sd_notify, and the device parts the acquire service composes."""
