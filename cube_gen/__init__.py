"""DeepEarth Cube: recipes, cube schema and access for the DeepEarth multimodal data."""

__version__ = "0.1.0"
