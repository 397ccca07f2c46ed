"""knhk_memory's pluggy plugins (installed as ``knhk_memory.plugins``)."""
