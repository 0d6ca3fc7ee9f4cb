"""Not code: the DeepSpeed JSON templates of this folder are installed with the package as
``mks2._ds_configs`` (``setup.py``), so a non-editable install finds them. Look them up with
``mks2.config.bundled.ds_template(name)``; ``parallel.ds_config`` may still name any other file."""
