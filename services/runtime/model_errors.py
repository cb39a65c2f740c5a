"""Errors the model services raise and the transport maps to statuses (torch-free: the runtime imports it)."""

from __future__ import annotations


class PrefixNotHeld(RuntimeError):
    """A Verify referenced a prefix (by length and hash) that the session's cache does not hold:
    the caller sends the whole sequence instead."""


class ModelError(RuntimeError):
    """A forward pass failed for a reason other than cancellation or device memory; the message names
    the model, the sequence length and the cause."""


class DeviceOutOfMemory(RuntimeError):
    """The device ran out of memory for a forward pass: an overload (the caller may retry elsewhere or
    later), not a broken service."""
