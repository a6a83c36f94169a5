"""Reading and writing: validated image input, atomic output."""

from .atomic import (atomic_path, atomic_dir, staged_outputs, write_json, write_text, ensure_output_file,
                     ensure_writable_dir, safe_join)
from .images import read_image, write_image, check_image, check_same_geometry, same_grid

__all__ = [
    "atomic_path", "atomic_dir", "staged_outputs", "write_json", "write_text", "ensure_output_file",
    "ensure_writable_dir", "safe_join",
    "read_image", "write_image", "check_image", "check_same_geometry", "same_grid",
]
