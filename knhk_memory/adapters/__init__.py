"""Adapters between knhk-memory and existing workflow engines.

Each adapter imports its engine lazily and ships behind an extra
(``knhk-memory[spiff]`` for :mod:`knhk_memory.adapters.spiff`); importing this
package imports no engine.
"""
