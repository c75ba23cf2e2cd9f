"""TFLite / LiteRT backend (litert-torch converter); see convert.py."""
