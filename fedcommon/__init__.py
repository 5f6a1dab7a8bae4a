"""What fedlearn's roles share; the distribution's version is kept here, once."""

__version__ = "0.1.0"
