"""LightningDataModules reading the datasets' real on-disk formats."""
