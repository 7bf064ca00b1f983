"""RecBole yaml defaults shipped with the plugin: importable as a package so that
``importlib.resources`` finds these files in an installed copy and in a checkout alike."""
