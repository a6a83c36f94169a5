"""Slicer-side code of the CT-SMA extension (shared by the CTSMA and CTSMARegistration modules).

- :mod:`.scene_bridge` - SimpleITK images/transforms, label images and tables <-> MRML nodes;
- :mod:`.process` - runs the ``ctsma`` command line in a background process (no Qt);
- :mod:`.analysis_logic`, :mod:`.registration_logic` - the module Logic classes;
- :mod:`.headless` - a real MRML scene without the application (tests, batch scripts);
- :mod:`.ui_check` - checks that the widget names the code uses exist in the ``.ui`` files.

Nothing here imports Qt; the algorithms live in the ``ctsma`` package. Submodules are imported
on demand so that importing the package costs nothing.
"""
