"""Bridges from other libraries to the attnzoo ops.

* :mod:`attnzoo.integrations.transformers`: an attention backend for Hugging
  Face ``transformers`` (``attn_implementation="attnzoo"`` after
  ``attnzoo.integrations.transformers.register()``).

The submodules import their library only when they are imported themselves.
"""
