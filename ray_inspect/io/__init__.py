"""Storage and decoding: local paths and s3://, images, data sets, model directories, patch stores."""
