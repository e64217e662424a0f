"""Aftercare reminders: turn a clinic booking into timed reminders and deliver each once."""

__version__ = "0.1.0"
