"""Admission: room lifecycle and joins; the front door of a live room."""
