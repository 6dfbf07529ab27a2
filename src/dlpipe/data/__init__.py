"""Getting the raw datasets onto disk, verified, and reading them into a common format."""
