"""Small shared utilities: peak-memory measurement, seeding, atomic file writes, malloc tuning.
Imports nothing from deqrobust but :mod:`deqrobust.errors`."""
