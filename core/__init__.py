"""The small core every layer uses: the config toolkit and domains, errors, runtime and distributed helpers."""
