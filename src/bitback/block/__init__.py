"""Block layer: the driver interface, the drivers, and opening images as chains."""
