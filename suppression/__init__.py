"""Suppression: the single answer to "may we email this address, for this purpose, now?"."""
