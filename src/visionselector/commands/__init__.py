"""The commands of ``visionselector``, one module each with its settings dataclass and runner."""
