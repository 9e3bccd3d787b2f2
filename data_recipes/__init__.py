"""Data recipes: turn raw image-text data into WebDataset shards (`python -m data_recipes.<name>`)."""
