"""Data: pretraining shards (download, splits, row-group iteration)."""
