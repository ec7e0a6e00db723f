"""Applications built on the core package: commands that read a run's outputs (``jointssl report``).

The core package (``jointssl_monai.data``, ``networks``, ``losses``, ``engines``, ``handlers``, ``transfer``,
``utils``) never imports from here. Modules here may need optional extras (the report needs matplotlib: the
``report`` extra) and import them only when called.
"""
