"""The relay: speakers publish audio frames, listeners receive them as chunks serialised once per room."""
