"""Studies that train many models or need another environment (hours, or the mmdetection venv)."""
