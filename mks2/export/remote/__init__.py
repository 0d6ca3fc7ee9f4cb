"""Templates of the Python files an exported MKS2 model ships for ``trust_remote_code``.

These are ordinary, importable modules of the package (so they are linted and tested like the rest);
``mks2.export.bundle`` copies them, together with every package module they import, into the export
directory with the ``mks2.*`` imports rewritten to flat relative ones.
"""
