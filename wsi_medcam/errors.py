"""One exception hierarchy for the whole package.

Each error also inherits the builtin it resembles, so callers that only know the standard library
(``except OSError``) still catch it. Messages name the slide or bundle and what to do next.
"""

from __future__ import annotations


class WsiMedcamError(Exception):
    """Root of every error this package raises on purpose."""


class SlideOpenError(WsiMedcamError, OSError):
    """The file is missing, unreadable, or no backend recognises it as a slide."""


class SlideReadError(WsiMedcamError, OSError):
    """A read failed in the middle of a slide (corrupt tile, truncated file)."""


class MissingMetadataError(WsiMedcamError, ValueError):
    """A slide lacks metadata the pipeline cannot guess, e.g. microns per pixel."""


class ResolutionError(WsiMedcamError, ValueError):
    """The slide cannot be read at the requested resolution (e.g. it would need upsampling)."""


class BundleError(WsiMedcamError, ValueError):
    """A model bundle is missing files, has the wrong kind, or its weights don't fit its architecture."""


class ConfigError(WsiMedcamError, ValueError):
    """A configuration file or override is invalid."""


class OutputError(WsiMedcamError, OSError):
    """Outputs could not be written (permissions, disk full, locked folder)."""
