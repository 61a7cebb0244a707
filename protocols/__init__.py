"""The shipped protocols, one YAML file each: a package (``cssbench.shipped_protocols``) so that
an installed cssbench carries them (pyproject.toml); ``cssbench.protocols`` reads them."""
