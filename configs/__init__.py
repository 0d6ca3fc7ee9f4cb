"""Not code: the run configs of this folder (``*.yaml``) are installed with the package as
``mks2._configs`` (``setup.py``), so a non-editable install finds them. Look them up with
``mks2.config.bundled.bundled_config(name)``; users keep editing and passing ``configs/*.yaml`` as files."""
