"""Pipeline stages: functions with typed inputs and outputs, each cached by content."""
