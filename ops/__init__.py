"""Jobs, sensors, schedules and the Definitions that tie the assets to an instance."""
