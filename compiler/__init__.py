"""compiler: turns JAX / Flax programs into wafer programs (see ../shared/DESIGN.md, "The compiler")."""
