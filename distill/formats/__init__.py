"""On-disk schemas. Nothing here imports the stages that write these files
(``buffer``, ``mtt``): a file must be readable without the method that made it."""
from .share import Recipe, Share, load_share, write_share

__all__ = ["Recipe", "Share", "load_share", "write_share"]
