"""The command-line tools, installed with the package as ``mks2._tools`` (setup.py) so that the ``mks2``
console script (mks2/cli.py) runs these same ``main`` functions; each file is also a script of its own."""
