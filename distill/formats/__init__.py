"""On-disk schemas. Nothing here imports the stages that write these files
(``buffer``, ``mtt``): a file must be readable without the method that made it."""
